/* Gates between CPython subinterpreters that switch the calling thread, like an MPK gate.
 *
 * A call does not hand work to another thread: the calling OS thread detaches from its own
 * interpreter (releasing that interpreter's GIL), attaches a thread state of the target
 * interpreter (taking the target's GIL), runs the target's dispatcher on the frame, and switches
 * back. No thread hop, no queue, no polling. Each OS thread gets one thread state per interpreter
 * it enters, created on first use and kept for the next call; nested calls back into the caller's
 * interpreter re-attach the caller's own, still-detached thread state.
 *
 * Frames are copied into the target interpreter (objects never cross); a large read-only buffer
 * can be lent without a copy (`lend`), pinned by the lender until the borrower lets go.
 *
 * The main interpreter is the app; every interpreter made here is a compartment, whose code may be
 * hostile and can import this module too. So the module, not its callers, enforces who may do
 * what: only the app creates, runs code in and ends interpreters, adopts their gates and lends
 * buffers; a compartment registers one gate (its dispatcher, which only the app may call) and
 * calls only the gate the app registered for it; a loan is borrowed only by the compartment it
 * was lent to. Each compartment is also marked as running its main program, CPython's own mark
 * that makes the stdlib's `_interpreters` refuse to exec, call or end it (as it refuses the app's
 * interpreter, marked by Py_Main). None of this stops native code in a compartment (ctypes,
 * /proc/self/mem), which shares the app's address space.
 *
 * Python API (all ids are ints):
 *   create() -> interp_id               (app) a new interpreter with its own GIL and allocator
 *   run(interp_id, source) -> int|str|None   (app) exec source there; returns its `result` variable
 *   register(dispatch[, caller]) -> endpoint_id   dispatch(bytes) -> bytes, served in the current
 *                                       interpreter; the app names the compartment that may call
 *                                       it, a compartment's (one) endpoint is the app's to call
 *   adopt(endpoint_id, interp_id, max_reply)  (app) check that compartment `interp_id` registered
 *                                       that endpoint; bound its replies (-1: no bound)
 *   unregister(endpoint_id)
 *   call(endpoint_id, frame[, deadline]) -> bytes   switch into the endpoint's interpreter and
 *                                       dispatch; PeerGone once it is ended, ReplyTooLarge past
 *                                       its bound, PermissionError for an endpoint not ours to call
 *   destroy(interp_id)                  (app) end an interpreter (no call may be running in it)
 *   lend(buffer, endpoint_id) -> (loan_id, address, length)  (app) pin a read-only buffer for the
 *                                       compartment behind that endpoint
 *   borrow(loan_id, address, length) -> memoryview  (in that compartment) zero-copy view of a loan
 *   pending_loans() -> int              buffers this interpreter has lent and not got back
 * Pins whose borrowers let go are dropped in the lender at its next call or loan.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if PY_VERSION_HEX >= 0x030D0000
#define FLEXOS_OWN_GIL 1
#endif

#ifdef FLEXOS_OWN_GIL

/* CPython's mark of an interpreter busy running its program: internal, but exported (the stdlib's
 * _interpreters and Py_Main use it), in pycore_pystate.h since 3.13. */
PyAPI_FUNC(int) _PyInterpreterState_SetRunningMain(PyInterpreterState *);
PyAPI_FUNC(void) _PyInterpreterState_SetNotRunningMain(PyInterpreterState *);
PyAPI_FUNC(int) _PyInterpreterState_IsRunningMain(PyInterpreterState *);

#define MAX_INTERPRETERS 256
#define MAX_ENDPOINTS 1024
#define MAX_THREAD_SLOTS 32
#define MAX_LOANS 4096
/* An endpoint's or a loan's id is (generation << SHIFT) | its index in the table, and the index is
 * read back with `id & (MAX - 1)`: that needs a power-of-two table no larger than 1 << SHIFT. */
#define ENDPOINT_ID_SHIFT 10
#define LOAN_ID_SHIFT 12
_Static_assert((MAX_ENDPOINTS & (MAX_ENDPOINTS - 1)) == 0, "MAX_ENDPOINTS must be a power of two");
_Static_assert(MAX_ENDPOINTS <= (1 << ENDPOINT_ID_SHIFT), "an endpoint's index must fit below its generation");
_Static_assert((MAX_LOANS & (MAX_LOANS - 1)) == 0, "MAX_LOANS must be a power of two");
_Static_assert(MAX_LOANS <= (1 << LOAN_ID_SHIFT), "a loan's index must fit below its generation");

typedef struct {
    int64_t id; /* 0: free */
    PyInterpreterState *interp;
} Interp;

typedef struct {
    int64_t id; /* 0: free; else (generation << ENDPOINT_ID_SHIFT) | index */
    int64_t interp_id;
    PyInterpreterState *interp;
    int64_t caller;        /* the one other interpreter that may call it */
    Py_ssize_t max_reply;  /* the longest reply accepted from it; -1: no bound */
    PyObject *dispatch;    /* a strong reference owned by `interp` */
    long active;           /* calls in flight */
} Endpoint;

typedef struct Created {
    PyThreadState *tstate;
    int64_t interp_id;
    struct Created *next;
} Created;

typedef struct {
    int64_t interp_id;
    PyThreadState *tstate;
} ThreadSlot;

typedef struct {
    int64_t id; /* 0: free */
    int64_t lender;       /* interpreter that owns `object` */
    int64_t borrower;     /* the one interpreter that may borrow it */
    PyObject *object;     /* strong reference, owned by the lender */
    Py_buffer view;
    int borrowed;         /* a loan is borrowed once: one view, one release */
    int returned;         /* the borrower let go; the lender may drop the pin */
} Loan;

typedef struct {
    PyTypeObject *borrowed_type;
    PyObject *peer_gone;       /* flexos.transports.PeerGone: the peer interpreter was ended */
    PyObject *protocol_error;  /* flexos.errors.ProtocolError: its dispatcher failed */
    PyObject *reply_too_large; /* flexos.transports.ReplyTooLarge: its reply is over the bound */
} ModuleState;

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static Interp interpreters[MAX_INTERPRETERS];
static Endpoint endpoints[MAX_ENDPOINTS];
static int64_t endpoint_generation = 1;
static Created *created; /* thread states this module made, so `destroy` can delete them */
static Loan loans[MAX_LOANS];
static int64_t loan_generation = 1;
static int returned_slots[MAX_LOANS]; /* loans whose borrower let go, not yet unpinned */
static int returned_count;

static _Thread_local ThreadSlot thread_slots[MAX_THREAD_SLOTS];
static _Thread_local int thread_slot_count;

static int64_t
current_interp_id(void)
{
    return PyInterpreterState_GetID(PyInterpreterState_Get());
}

static int64_t
main_interp_id(void)
{
    return PyInterpreterState_GetID(PyInterpreterState_Main());
}

/* The app's own operations: -1 with PermissionError set when a compartment asks for one. */
static int
refuse_unless_app(const char *what)
{
    if (PyInterpreterState_Get() == PyInterpreterState_Main()) {
        return 0;
    }
    PyErr_Format(PyExc_PermissionError, "flexos._subinterp.%s: only the app may do this, not a compartment", what);
    return -1;
}

static ThreadSlot *
find_slot(int64_t interp_id)
{
    for (int i = 0; i < thread_slot_count; i++) {
        if (thread_slots[i].interp_id == interp_id) {
            return &thread_slots[i];
        }
    }
    return NULL;
}

static int
add_slot(int64_t interp_id, PyThreadState *tstate)
{
    for (int i = 0; i < thread_slot_count; i++) {
        if (thread_slots[i].tstate == NULL) {
            thread_slots[i].interp_id = interp_id;
            thread_slots[i].tstate = tstate;
            return 0;
        }
    }
    if (thread_slot_count == MAX_THREAD_SLOTS) {
        return -1;
    }
    thread_slots[thread_slot_count].interp_id = interp_id;
    thread_slots[thread_slot_count].tstate = tstate;
    thread_slot_count++;
    return 0;
}

static void
drop_slot(int64_t interp_id)
{
    ThreadSlot *slot = find_slot(interp_id);
    if (slot != NULL) {
        slot->interp_id = 0;
        slot->tstate = NULL;
    }
}

/* This thread's state in `interp`, made on first use. Also remembers the thread's state in the
 * interpreter it is leaving, so that a nested call back re-attaches that very state. */
static PyThreadState *
thread_state_for(PyInterpreterState *interp, int64_t interp_id, PyThreadState *here, int64_t here_id)
{
    if (find_slot(here_id) == NULL && add_slot(here_id, here) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "flexos: this thread entered too many interpreters");
        return NULL;
    }
    ThreadSlot *slot = find_slot(interp_id);
    if (slot != NULL) {
        return slot->tstate;
    }
    Created *record = PyMem_RawMalloc(sizeof(Created));
    if (record == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    PyThreadState *tstate = PyThreadState_New(interp);
    if (tstate == NULL || add_slot(interp_id, tstate) < 0) {
        PyMem_RawFree(record);
        if (tstate != NULL) {
            PyThreadState_Delete(tstate);
        }
        PyErr_SetString(PyExc_RuntimeError, "flexos: cannot make a thread state for the compartment");
        return NULL;
    }
    record->tstate = tstate;
    record->interp_id = interp_id;
    pthread_mutex_lock(&registry_lock);
    record->next = created;
    created = record;
    pthread_mutex_unlock(&registry_lock);
    return tstate;
}

static Interp *
find_interp(int64_t interp_id)
{
    for (int i = 0; i < MAX_INTERPRETERS; i++) {
        if (interpreters[i].id == interp_id && interp_id != 0) {
            return &interpreters[i];
        }
    }
    return NULL;
}

/* The current exception as malloc'd UTF-8 text "Type: message"; clears it. NULL when even that
 * copy runs out of memory, so callers keep "it failed" apart from the text (see Failure). */
static char *
exception_text(void)
{
    PyObject *exc = PyErr_GetRaisedException();
    char *text = NULL;
    if (exc != NULL) {
        PyObject *formatted = PyUnicode_FromFormat("%s: %S", Py_TYPE(exc)->tp_name, exc);
        if (formatted != NULL) {
            const char *utf8 = PyUnicode_AsUTF8(formatted);
            if (utf8 != NULL) {
                text = strdup(utf8);
            }
            Py_DECREF(formatted);
        }
        Py_DECREF(exc);
    }
    PyErr_Clear();
    return text != NULL ? text : strdup("unknown error");
}

/* What went wrong inside another interpreter, carried out of it as C data: `failed` is the
 * verdict, `text` its malloc'd description (NULL if that could not be allocated). */
typedef struct {
    int failed;
    char *text;
} Failure;

static void
fail_with(Failure *failure, const char *message)
{
    failure->failed = 1;
    failure->text = strdup(message);
}

static void
fail_with_exception(Failure *failure)
{
    failure->failed = 1;
    failure->text = exception_text();
}

/* Back in the caller's interpreter: raise `type` with the failure's text, and free it. */
static void
raise_failure(Failure *failure, PyObject *type, const char *context)
{
    PyErr_Format(type, "%s%s", context, failure->text != NULL ? failure->text : "(out of memory describing the error)");
    free(failure->text);
    failure->text = NULL;
}

/* In a forked child CPython has deleted every subinterpreter: forget them all (their objects are
 * gone with them), and unpin buffers lent to them at the app's next call. */
static void
after_fork_child(void)
{
    pthread_mutex_init(&registry_lock, NULL); /* another thread may have held it at fork() */
    memset(interpreters, 0, sizeof(interpreters));
    memset(endpoints, 0, sizeof(endpoints));
    created = NULL;
    thread_slot_count = 0;
    returned_count = 0;
    for (int i = 0; i < MAX_LOANS; i++) {
        if (loans[i].id != 0) {
            loans[i].returned = 1;
            returned_slots[returned_count++] = i;
        }
    }
}

static PyObject *
subinterp_create(PyObject *module, PyObject *unused)
{
    if (refuse_unless_app("create") < 0) {
        return NULL;
    }
    if (!_PyInterpreterState_IsRunningMain(PyInterpreterState_Main())) {
        return PyErr_Format(PyExc_RuntimeError, "flexos: the app's interpreter is not marked as running its program "
                                                "(embedded without Py_RunMain?), so compartments could run code in it "
                                                "through the stdlib's _interpreters");
    }
    PyThreadState *here = PyThreadState_Get();
    int64_t here_id = current_interp_id();
    if (find_slot(here_id) == NULL && add_slot(here_id, here) < 0) {
        return PyErr_Format(PyExc_RuntimeError, "flexos: this thread entered too many interpreters");
    }
    Created *record = PyMem_RawMalloc(sizeof(Created));
    if (record == NULL) {
        return PyErr_NoMemory();
    }
    PyInterpreterConfig config = {
        .use_main_obmalloc = 0,
        .allow_fork = 0,
        .allow_exec = 0,
        .allow_threads = 1,
        .allow_daemon_threads = 0,
        .check_multi_interp_extensions = 1,
        .gil = PyInterpreterConfig_OWN_GIL,
    };
    PyThreadState *sub = NULL;
    PyStatus status = Py_NewInterpreterFromConfig(&sub, &config);
    if (PyStatus_Exception(status) || sub == NULL) {
        PyThreadState_Swap(here);
        PyMem_RawFree(record);
        return PyErr_Format(PyExc_RuntimeError, "cannot create a subinterpreter: %s",
                            status.err_msg ? status.err_msg : "unknown error");
    }
    int64_t sub_id = PyInterpreterState_GetID(PyThreadState_GetInterpreter(sub));
    PyInterpreterState *interp = PyThreadState_GetInterpreter(sub);
    int marked = _PyInterpreterState_SetRunningMain(interp); /* `sub` is current: it cannot fail */
    PyErr_Clear();
    PyThreadState_Swap(here);

    pthread_mutex_lock(&registry_lock);
    Interp *free_entry = NULL;
    for (int i = 0; i < MAX_INTERPRETERS && free_entry == NULL; i++) {
        if (interpreters[i].id == 0) {
            free_entry = &interpreters[i];
        }
    }
    if (free_entry != NULL) {
        free_entry->id = sub_id;
        free_entry->interp = interp;
        record->tstate = sub;
        record->interp_id = sub_id;
        record->next = created;
        created = record;
    }
    pthread_mutex_unlock(&registry_lock);
    if (free_entry == NULL || marked < 0 || add_slot(sub_id, sub) < 0) {
        /* Out of room: end it again rather than leak it. */
        PyThreadState_Swap(sub);
        if (marked == 0) {
            _PyInterpreterState_SetNotRunningMain(interp);
        }
        Py_EndInterpreter(sub);
        PyThreadState_Swap(here);
        if (free_entry != NULL) {
            pthread_mutex_lock(&registry_lock);
            free_entry->id = 0;
            created = record->next;
            pthread_mutex_unlock(&registry_lock);
        }
        PyMem_RawFree(record);
        return PyErr_Format(PyExc_RuntimeError, "flexos: too many subinterpreters");
    }
    return PyLong_FromLongLong(sub_id);
}

/* Switch this thread from interpreter `here_id` (the current one) into interpreter `interp_id`;
 * NULL with an exception set on failure. */
static PyThreadState *
enter(int64_t interp_id, PyInterpreterState *interp, int64_t here_id, PyThreadState **here_out)
{
    PyThreadState *here = PyThreadState_Get();
    PyThreadState *there = thread_state_for(interp, interp_id, here, here_id);
    if (there == NULL) {
        return NULL;
    }
    *here_out = here;
    PyThreadState_Swap(there);
    return there;
}

static PyObject *
subinterp_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_Check(args[0]) || !PyUnicode_Check(args[1])) {
        return PyErr_Format(PyExc_TypeError, "run(interp_id: int, source: str)");
    }
    if (refuse_unless_app("run") < 0) {
        return NULL;
    }
    int64_t interp_id = PyLong_AsLongLong(args[0]);
    const char *source = PyUnicode_AsUTF8(args[1]);
    if (source == NULL) {
        return NULL;
    }
    pthread_mutex_lock(&registry_lock);
    Interp *entry = find_interp(interp_id);
    PyInterpreterState *interp = entry ? entry->interp : NULL;
    pthread_mutex_unlock(&registry_lock);
    if (interp == NULL) {
        return PyErr_Format(PyExc_LookupError, "no subinterpreter %lld", (long long)interp_id);
    }
    PyThreadState *here;
    if (enter(interp_id, interp, current_interp_id(), &here) == NULL) {
        return NULL;
    }
    /* In the target: run, then carry `result` out as plain C data. */
    Failure failure = {0, NULL};
    char *text = NULL;
    long long number = 0;
    int kind = 0; /* 0 None, 1 int, 2 str */
    PyObject *globals = PyDict_New();
    PyObject *builtins = PyImport_ImportModule("builtins");
    if (globals == NULL || builtins == NULL || PyDict_SetItemString(globals, "__builtins__", builtins) < 0) {
        fail_with_exception(&failure);
    }
    else {
        PyObject *done = PyRun_String(source, Py_file_input, globals, globals);
        if (done == NULL) {
            fail_with_exception(&failure);
        }
        else {
            Py_DECREF(done);
            PyObject *result = PyDict_GetItemString(globals, "result");
            if (result != NULL && PyLong_Check(result)) {
                number = PyLong_AsLongLong(result);
                kind = 1;
            }
            else if (result != NULL && PyUnicode_Check(result)) {
                const char *utf8 = PyUnicode_AsUTF8(result);
                text = utf8 != NULL ? strdup(utf8) : NULL;
                kind = 2;
            }
            if (PyErr_Occurred()) {
                fail_with_exception(&failure);
            }
            else if (kind == 2 && text == NULL) {
                fail_with(&failure, "MemoryError: no memory to copy `result` out of the subinterpreter");
            }
        }
    }
    Py_XDECREF(builtins);
    Py_XDECREF(globals);
    PyThreadState_Swap(here);
    if (failure.failed) {
        raise_failure(&failure, PyExc_RuntimeError, "");
        free(text);
        return NULL;
    }
    if (kind == 1) {
        return PyLong_FromLongLong(number);
    }
    if (kind == 2) {
        PyObject *value = PyUnicode_FromString(text);
        free(text);
        return value;
    }
    Py_RETURN_NONE;
}

/* register(dispatch[, caller]): in the app, `caller` is the compartment that may call it; in a
 * compartment there is no choice (the app calls it) and only one: a compartment has one gate. */
static PyObject *
subinterp_register(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int in_app = PyInterpreterState_Get() == PyInterpreterState_Main();
    if (nargs != (in_app ? 2 : 1) || !PyCallable_Check(args[0])) {
        return PyErr_Format(PyExc_TypeError, in_app ? "register(dispatch, caller: int) in the app"
                                                    : "register(dispatch) in a compartment");
    }
    PyObject *dispatch = args[0];
    int64_t caller = in_app ? PyLong_AsLongLong(args[1]) : main_interp_id();
    if (caller == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t interp_id = current_interp_id();
    pthread_mutex_lock(&registry_lock);
    int refused = in_app ? find_interp(caller) == NULL : 0;
    for (int i = 0; i < MAX_ENDPOINTS && !in_app; i++) {
        refused |= endpoints[i].id != 0 && endpoints[i].interp_id == interp_id;
    }
    for (int i = 0; i < MAX_ENDPOINTS && !refused; i++) {
        if (endpoints[i].id == 0) {
            int64_t id = (endpoint_generation++ << ENDPOINT_ID_SHIFT) | i;
            endpoints[i].id = id;
            endpoints[i].interp_id = interp_id;
            endpoints[i].interp = PyInterpreterState_Get();
            endpoints[i].caller = caller;
            endpoints[i].max_reply = -1;
            endpoints[i].dispatch = Py_NewRef(dispatch);
            endpoints[i].active = 0;
            pthread_mutex_unlock(&registry_lock);
            return PyLong_FromLongLong(id);
        }
    }
    pthread_mutex_unlock(&registry_lock);
    if (refused && in_app) {
        return PyErr_Format(PyExc_LookupError, "no compartment interpreter %lld", (long long)caller);
    }
    if (refused) {
        return PyErr_Format(PyExc_PermissionError, "flexos._subinterp.register: a compartment has one gate");
    }
    return PyErr_Format(PyExc_RuntimeError, "flexos: too many subinterpreter gates");
}

static PyObject *
subinterp_adopt(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (refuse_unless_app("adopt") < 0) {
        return NULL;
    }
    if (nargs != 3) {
        return PyErr_Format(PyExc_TypeError, "adopt(endpoint_id, interp_id, max_reply)");
    }
    int64_t id = PyLong_AsLongLong(args[0]);
    int64_t interp_id = PyLong_AsLongLong(args[1]);
    Py_ssize_t max_reply = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    pthread_mutex_lock(&registry_lock);
    Endpoint *endpoint = &endpoints[id & (MAX_ENDPOINTS - 1)];
    int found = endpoint->id == id && endpoint->interp_id == interp_id && find_interp(interp_id) != NULL;
    if (found) {
        endpoint->max_reply = max_reply < 0 ? -1 : max_reply;
    }
    pthread_mutex_unlock(&registry_lock);
    if (!found) {
        return PyErr_Format(PyExc_LookupError, "compartment %lld registered no gate %lld", (long long)interp_id,
                            (long long)id);
    }
    Py_RETURN_NONE;
}

static PyObject *
subinterp_unregister(PyObject *module, PyObject *arg)
{
    int64_t id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t here_id = current_interp_id();
    PyObject *dispatch = NULL;
    pthread_mutex_lock(&registry_lock);
    Endpoint *endpoint = &endpoints[id & (MAX_ENDPOINTS - 1)];
    if (endpoint->id == id && endpoint->interp_id == here_id) {
        dispatch = endpoint->dispatch;
        endpoint->id = 0;
        endpoint->dispatch = NULL;
    }
    pthread_mutex_unlock(&registry_lock);
    Py_XDECREF(dispatch); /* we are in its interpreter */
    Py_RETURN_NONE;
}

static void release_returned_loans(void);

/* call(endpoint, frame[, deadline]): the transport's `exchange` itself (a deadline means nothing
 * here: the callee runs on our own thread). */
static PyObject *
subinterp_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3 || !PyBytes_Check(args[1])) {
        return PyErr_Format(PyExc_TypeError, "call(endpoint_id: int, frame: bytes, deadline=None)");
    }
    ModuleState *state = PyModule_GetState(module);
    int64_t id = PyLong_AsLongLong(args[0]);
    if (id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t here_id = current_interp_id();
    pthread_mutex_lock(&registry_lock);
    Endpoint *endpoint = &endpoints[id & (MAX_ENDPOINTS - 1)];
    if (endpoint->id != id) {
        pthread_mutex_unlock(&registry_lock);
        return PyErr_Format(state->peer_gone, "the compartment's gate is closed");
    }
    int64_t interp_id = endpoint->interp_id;
    if (endpoint->caller != here_id && interp_id != here_id) {
        pthread_mutex_unlock(&registry_lock);
        return PyErr_Format(PyExc_PermissionError, "flexos._subinterp.call: gate %lld is not this interpreter's to call",
                            (long long)id);
    }
    endpoint->active++;
    PyInterpreterState *interp = endpoint->interp;
    Py_ssize_t max_reply = endpoint->max_reply;
    PyObject *dispatch = endpoint->dispatch; /* kept alive by `active` */
    pthread_mutex_unlock(&registry_lock);

    PyObject *result = NULL;
    if (interp_id == here_id) {
        result = PyObject_CallOneArg(dispatch, args[1]);
    }
    else {
        PyThreadState *here;
        const char *data = PyBytes_AS_STRING(args[1]);
        Py_ssize_t size = PyBytes_GET_SIZE(args[1]);
        if (enter(interp_id, interp, here_id, &here) != NULL) {
            /* In the target interpreter: the caller's frame stays alive (we hold it) and bytes
             * are immutable, so reading it without the caller's GIL is safe. */
            Failure failure = {0, NULL};
            char *reply = NULL;
            Py_ssize_t reply_size = 0;
            int too_large = 0;
            PyObject *frame = PyBytes_FromStringAndSize(data, size);
            PyObject *answer = frame ? PyObject_CallOneArg(dispatch, frame) : NULL;
            Py_XDECREF(frame);
            if (answer != NULL && PyBytes_Check(answer) && max_reply >= 0 && PyBytes_GET_SIZE(answer) > max_reply) {
                too_large = 1; /* not copied: the app never holds more than the bound */
                reply_size = PyBytes_GET_SIZE(answer);
            }
            else if (answer != NULL && PyBytes_Check(answer)) {
                reply_size = PyBytes_GET_SIZE(answer);
                reply = malloc(reply_size ? reply_size : 1);
                if (reply != NULL) {
                    memcpy(reply, PyBytes_AS_STRING(answer), reply_size);
                }
                else {
                    fail_with(&failure, "out of memory for the reply");
                }
            }
            else if (answer != NULL) {
                fail_with(&failure, "the compartment's dispatcher returned a non-bytes reply");
            }
            else {
                fail_with_exception(&failure);
            }
            Py_XDECREF(answer);
            PyThreadState_Swap(here);
            if (too_large) {
                PyErr_Format(state->reply_too_large, "a reply of %zd bytes is over the max_reply of %zd bytes", reply_size,
                             max_reply);
            }
            else if (failure.failed) {
                raise_failure(&failure, state->protocol_error, "compartment failed to answer: ");
            }
            else {
                result = PyBytes_FromStringAndSize(reply, reply_size);
            }
            free(reply);
        }
    }
    pthread_mutex_lock(&registry_lock);
    endpoint->active--;
    pthread_mutex_unlock(&registry_lock);
    release_returned_loans();
    return result;
}

static PyObject *
subinterp_destroy(PyObject *module, PyObject *arg)
{
    if (refuse_unless_app("destroy") < 0) {
        return NULL;
    }
    int64_t interp_id = PyLong_AsLongLong(arg);
    if (interp_id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (interp_id == current_interp_id()) {
        return PyErr_Format(PyExc_RuntimeError, "a subinterpreter cannot destroy itself");
    }
    pthread_mutex_lock(&registry_lock);
    Interp *entry = find_interp(interp_id);
    PyInterpreterState *interp = entry ? entry->interp : NULL;
    int busy = 0;
    for (int i = 0; i < MAX_ENDPOINTS; i++) {
        if (endpoints[i].id != 0 && endpoints[i].interp_id == interp_id && endpoints[i].active) {
            busy = 1;
        }
    }
    pthread_mutex_unlock(&registry_lock);
    if (interp == NULL) {
        Py_RETURN_NONE;
    }
    if (busy) {
        return PyErr_Format(PyExc_RuntimeError, "calls are still running in the subinterpreter");
    }
    PyThreadState *here;
    PyThreadState *there = enter(interp_id, interp, current_interp_id(), &here);
    if (there == NULL) {
        return NULL;
    }
    PyFrameObject *frame = PyThreadState_GetFrame(there);
    if (frame != NULL) {
        Py_DECREF(frame);
        PyThreadState_Swap(here);
        return PyErr_Format(PyExc_RuntimeError, "cannot end a subinterpreter from inside a call into it");
    }
    /* Inside the dying interpreter: drop its gates and the thread states we made. */
    pthread_mutex_lock(&registry_lock);
    PyObject *dispatches[MAX_ENDPOINTS];
    int count = 0;
    for (int i = 0; i < MAX_ENDPOINTS; i++) {
        if (endpoints[i].id != 0 && endpoints[i].interp_id == interp_id) {
            dispatches[count++] = endpoints[i].dispatch;
            endpoints[i].id = 0;
            endpoints[i].dispatch = NULL;
        }
    }
    Created **link = &created, *others = NULL;
    while (*link != NULL) {
        Created *record = *link;
        if (record->interp_id == interp_id) {
            *link = record->next;
            if (record->tstate == there) {
                PyMem_RawFree(record);
            }
            else {
                record->next = others;
                others = record;
            }
        }
        else {
            link = &record->next;
        }
    }
    entry->id = 0;
    entry->interp = NULL;
    pthread_mutex_unlock(&registry_lock);
    for (int i = 0; i < count; i++) {
        Py_DECREF(dispatches[i]);
    }
    while (others != NULL) {
        Created *next = others->next;
        PyThreadState_Clear(others->tstate);
        PyThreadState_Delete(others->tstate);
        PyMem_RawFree(others);
        others = next;
    }
    drop_slot(interp_id);
    _PyInterpreterState_SetNotRunningMain(interp);
    Py_EndInterpreter(there);
    PyThreadState_Swap(here);
    /* Loans it never borrowed (or whose views outlived it) will never be let go of: unpin them. */
    pthread_mutex_lock(&registry_lock);
    for (int i = 0; i < MAX_LOANS; i++) {
        if (loans[i].id != 0 && loans[i].borrower == interp_id && !loans[i].returned) {
            loans[i].returned = 1;
            returned_slots[returned_count++] = i;
        }
    }
    pthread_mutex_unlock(&registry_lock);
    release_returned_loans();
    Py_RETURN_NONE;
}

/* -- zero-copy loans ---------------------------------------------------------------------- */

/* lend(buffer, endpoint): only the app lends (a compartment could change what it lent after the
 * app checked it), and only to the compartment behind `endpoint`. */
static PyObject *
subinterp_lend(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (refuse_unless_app("lend") < 0) {
        return NULL;
    }
    if (nargs != 2) {
        return PyErr_Format(PyExc_TypeError, "lend(buffer, endpoint_id)");
    }
    int64_t endpoint_id = PyLong_AsLongLong(args[1]);
    if (endpoint_id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    pthread_mutex_lock(&registry_lock);
    Endpoint *endpoint = &endpoints[endpoint_id & (MAX_ENDPOINTS - 1)];
    int64_t borrower = endpoint->id == endpoint_id ? endpoint->interp_id : -1;
    pthread_mutex_unlock(&registry_lock);
    if (borrower == -1) {
        return PyErr_Format(((ModuleState *)PyModule_GetState(module))->peer_gone, "the compartment's gate is closed");
    }
    if (borrower == main_interp_id()) { /* the app's own gate: the app never borrows */
        return PyErr_Format(PyExc_ValueError, "lend(buffer, endpoint_id): gate %lld is not a compartment's",
                            (long long)endpoint_id);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    release_returned_loans();
    int64_t lender = current_interp_id();
    pthread_mutex_lock(&registry_lock);
    for (int i = 0; i < MAX_LOANS; i++) {
        if (loans[i].id == 0) {
            int64_t id = (loan_generation++ << LOAN_ID_SHIFT) | i;
            loans[i].id = id;
            loans[i].lender = lender;
            loans[i].borrower = borrower;
            loans[i].object = Py_NewRef(args[0]);
            loans[i].view = view;
            loans[i].borrowed = 0;
            loans[i].returned = 0;
            pthread_mutex_unlock(&registry_lock);
            return Py_BuildValue("(LKn)", (long long)id, (unsigned long long)(uintptr_t)view.buf, view.len);
        }
    }
    pthread_mutex_unlock(&registry_lock);
    PyBuffer_Release(&view);
    return PyErr_Format(PyExc_RuntimeError, "flexos: too many buffers lent at once");
}

/* The borrower's side: a read-only exporter over the lender's memory. */
typedef struct {
    PyObject_HEAD
    int64_t loan;
    void *address;
    Py_ssize_t length;
    Py_ssize_t exports;
} Borrowed;

static int
borrowed_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    Borrowed *borrowed = (Borrowed *)self;
    if (PyBuffer_FillInfo(view, self, borrowed->address, borrowed->length, 1, flags) < 0) {
        return -1;
    }
    borrowed->exports++;
    return 0;
}

static void
borrowed_releasebuffer(PyObject *self, Py_buffer *view)
{
    ((Borrowed *)self)->exports--;
}

static void
borrowed_dealloc(PyObject *self)
{
    Borrowed *borrowed = (Borrowed *)self;
    int64_t id = borrowed->loan;
    pthread_mutex_lock(&registry_lock);
    Loan *loan = &loans[id & (MAX_LOANS - 1)];
    if (loan->id == id && !loan->returned) {
        loan->returned = 1; /* the lender drops its pin under its own GIL */
        returned_slots[returned_count++] = (int)(id & (MAX_LOANS - 1));
    }
    pthread_mutex_unlock(&registry_lock);
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyType_Slot borrowed_slots[] = {
    {Py_bf_getbuffer, borrowed_getbuffer},
    {Py_bf_releasebuffer, borrowed_releasebuffer},
    {Py_tp_dealloc, borrowed_dealloc},
    {Py_tp_doc, "Memory lent by another compartment of this process, read-only, not copied."},
    {0, NULL},
};

static PyType_Spec borrowed_spec = {
    .name = "flexos._subinterp.Borrowed",
    .basicsize = sizeof(Borrowed),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = borrowed_slots,
};


static PyObject *
subinterp_borrow(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long long id;
    unsigned long long address;
    Py_ssize_t length;
    if (nargs != 3) {
        return PyErr_Format(PyExc_TypeError, "borrow(loan, address, length)");
    }
    id = PyLong_AsLongLong(args[0]);
    address = PyLong_AsUnsignedLongLong(args[1]);
    length = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    /* Only a live loan, and exactly its memory: a peer cannot make us read arbitrary addresses. */
    pthread_mutex_lock(&registry_lock);
    Loan *loan = &loans[id & (MAX_LOANS - 1)];
    int valid = loan->id == id && !loan->borrowed && loan->borrower == current_interp_id() &&
                (uintptr_t)loan->view.buf == (uintptr_t)address && loan->view.len == length;
    if (valid) {
        loan->borrowed = 1; /* one view per loan: its release is the loan's return */
    }
    pthread_mutex_unlock(&registry_lock);
    if (!valid) {
        return PyErr_Format(PyExc_ValueError, "no such lent buffer");
    }
    ModuleState *state = PyModule_GetState(module);
    Borrowed *borrowed = PyObject_New(Borrowed, state->borrowed_type);
    if (borrowed == NULL) { /* give the loan back at once */
        pthread_mutex_lock(&registry_lock);
        loan->returned = 1;
        returned_slots[returned_count++] = (int)(id & (MAX_LOANS - 1));
        pthread_mutex_unlock(&registry_lock);
        return NULL;
    }
    borrowed->loan = id;
    borrowed->address = (void *)(uintptr_t)address;
    borrowed->length = length;
    borrowed->exports = 0;
    PyObject *view = PyMemoryView_FromObject((PyObject *)borrowed);
    Py_DECREF(borrowed);
    return view;
}

/* Unpin what borrowers let go of; called in the lender's interpreter after each call. Only the
 * returned loans are visited, and objects are released outside the lock (a dealloc may lend). */
static void
release_returned_loans(void)
{
    if (returned_count == 0) { /* racy read: a miss is caught on the next call */
        return;
    }
    int64_t lender = current_interp_id();
    for (;;) {
        PyObject *objects[64];
        Py_buffer views[64];
        int n = 0, kept = 0;
        pthread_mutex_lock(&registry_lock);
        for (int k = 0; k < returned_count; k++) {
            Loan *loan = &loans[returned_slots[k]];
            if (n < 64 && loan->lender == lender) {
                objects[n] = loan->object;
                views[n++] = loan->view;
                loan->id = 0;
                loan->object = NULL;
            }
            else {
                returned_slots[kept++] = returned_slots[k];
            }
        }
        returned_count = kept;
        pthread_mutex_unlock(&registry_lock);
        for (int j = 0; j < n; j++) {
            PyBuffer_Release(&views[j]);
            Py_DECREF(objects[j]);
        }
        if (n < 64) {
            return;
        }
    }
}

static PyObject *
subinterp_pending_loans(PyObject *module, PyObject *unused)
{
    int64_t lender = current_interp_id();
    long count = 0;
    pthread_mutex_lock(&registry_lock);
    for (int i = 0; i < MAX_LOANS; i++) {
        count += loans[i].id != 0 && loans[i].lender == lender;
    }
    pthread_mutex_unlock(&registry_lock);
    return PyLong_FromLong(count);
}

static PyMethodDef methods[] = {
    {"create", subinterp_create, METH_NOARGS, "create() -> id of a new interpreter with its own GIL"},
    {"run", (PyCFunction)(void (*)(void))subinterp_run, METH_FASTCALL, "run(id, source) -> its `result`"},
    {"register", (PyCFunction)(void (*)(void))subinterp_register, METH_FASTCALL,
     "register(dispatch[, caller]) -> endpoint id in this interpreter"},
    {"adopt", (PyCFunction)(void (*)(void))subinterp_adopt, METH_FASTCALL,
     "adopt(endpoint, interp, max_reply): the app takes a compartment's gate"},
    {"unregister", subinterp_unregister, METH_O, "unregister(endpoint id)"},
    {"call", (PyCFunction)(void (*)(void))subinterp_call, METH_FASTCALL, "call(endpoint, frame) -> reply"},
    {"destroy", subinterp_destroy, METH_O, "destroy(id): end an interpreter"},
    {"lend", (PyCFunction)(void (*)(void))subinterp_lend, METH_FASTCALL, "lend(buffer, endpoint) -> (loan, address, length)"},
    {"borrow", (PyCFunction)(void (*)(void))subinterp_borrow, METH_FASTCALL, "borrow(loan, address, length)"},
    {"pending_loans", subinterp_pending_loans, METH_NOARGS, "buffers this interpreter has lent out"},
    {NULL, NULL, 0, NULL},
};

static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void
install_fork_handler(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
}

static int
module_exec(PyObject *module)
{
    pthread_once(&fork_handler_once, install_fork_handler);
    ModuleState *state = PyModule_GetState(module);
    state->borrowed_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &borrowed_spec, NULL);
    if (state->borrowed_type == NULL) {
        return -1;
    }
    PyObject *transports = PyImport_ImportModule("flexos.transports");
    PyObject *errors = PyImport_ImportModule("flexos.errors");
    if (transports != NULL && errors != NULL) {
        state->peer_gone = PyObject_GetAttrString(transports, "PeerGone");
        state->reply_too_large = PyObject_GetAttrString(transports, "ReplyTooLarge");
        state->protocol_error = PyObject_GetAttrString(errors, "ProtocolError");
    }
    Py_XDECREF(transports);
    Py_XDECREF(errors);
    if (state->peer_gone == NULL || state->reply_too_large == NULL || state->protocol_error == NULL) {
        return -1;
    }
    return PyModule_AddIntConstant(module, "AVAILABLE", 1);
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *state = PyModule_GetState(module);
    Py_VISIT(state->borrowed_type);
    Py_VISIT(state->peer_gone);
    Py_VISIT(state->protocol_error);
    Py_VISIT(state->reply_too_large);
    return 0;
}

static int
module_clear(PyObject *module)
{
    ModuleState *state = PyModule_GetState(module);
    Py_CLEAR(state->borrowed_type);
    Py_CLEAR(state->peer_gone);
    Py_CLEAR(state->protocol_error);
    Py_CLEAR(state->reply_too_large);
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flexos._subinterp",
    .m_doc = "Thread-switching gates between subinterpreters (CPython 3.13+).",
    .m_size = sizeof(ModuleState),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
};

#else /* before 3.13: the module exists so that importing it says why the driver is unavailable */

static int
module_exec(PyObject *module)
{
    return PyModule_AddIntConstant(module, "AVAILABLE", 0);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flexos._subinterp",
    .m_doc = "Thread-switching gates between subinterpreters (needs CPython 3.13+).",
    .m_size = 0,
    .m_slots = slots,
};

#endif

PyMODINIT_FUNC
PyInit__subinterp(void)
{
    return PyModuleDef_Init(&module_def);
}
