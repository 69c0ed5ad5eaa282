/* The hot path of a shared-memory channel between two processes (flexos/transports/shm.py).
 *
 * A Ring holds the buffer of one channel's mapping (a writable export of its mmap, released by
 * release() before the mapping is closed) and does, in one C call each, what a gate round trip
 * otherwise spends most of its transport time on in Python:
 *
 *   publish(payload_off, frame, hdr_off, flags, seq, peer_sleep_off) -> bool
 *       copy the frame into the payload, store its length and flags, then its sequence number
 *       (a release store, so the reader that sees it sees the rest), issue a full fence, and
 *       say whether the peer sleeps (the caller then wakes it);
 *   spin(offset, value, budget_ns) -> int
 *       poll the u64 at offset (acquire loads, a pause between) until it is value: the ns it
 *       took; once the budget is spent, MISSED (-1), or NEEDS_CPU (-2) if we were preempted
 *       mid-spin (someone else wanted this CPU: perhaps the peer, which spinning only delays);
 *   park(sleep_off, offset, value, closed_off, efd, watch_fd, watch_events, timeout_ms) -> int
 *       the sleeping side of the Dekker handshake: set our "sleeping" flag, fence, look again;
 *       then poll the eventfd and the peer's watch fd with the GIL released. ARRIVED (0),
 *       CLOSED (1: the peer closed its side), GONE (2: the watch fd fired), or AGAIN (3: the
 *       timeout passed, or a signal came; the caller checks its deadline and calls again).
 *       Our flag is clear whenever it returns.
 *
 * Every offset is checked against the buffer, so a wrong one raises instead of touching memory
 * outside the mapping. The layout itself (what lives at which offset) is shm.py's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

enum { ARRIVED = 0, CLOSED = 1, GONE = 2, AGAIN = 3 };
enum { MISSED = -1, NEEDS_CPU = -2 };

/* A gap this long between two looks at the clock while spinning means we did not run. */
#define PREEMPTED_NS 20000

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int held;
} Ring;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The address of `size` bytes at `offset`, aligned to `align`; NULL with an exception set if
 * they are not inside the buffer. */
static char *at(Ring *self, Py_ssize_t offset, Py_ssize_t size, Py_ssize_t align) {
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "the ring's memory was released");
        return NULL;
    }
    if (offset < 0 || size < 0 || offset > self->view.len - size || offset % align) {
        PyErr_Format(PyExc_ValueError, "offset %zd (+%zd) is outside the ring's %zd bytes", offset, size,
                     self->view.len);
        return NULL;
    }
    return (char *)self->view.buf + offset;
}

/* The `want` integer arguments into `out`, except those whose bit is set in `skip`. */
static int ssize_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t *out, unsigned skip) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (skip >> i & 1)
            continue;
        out[i] = PyLong_AsSsize_t(args[i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static int ring_init(Ring *self, PyObject *args, PyObject *kwds) {
    PyObject *memory;
    if (!PyArg_ParseTuple(args, "O:Ring", &memory))
        return -1;
    if (self->held) {
        PyErr_SetString(PyExc_TypeError, "a Ring is initialised once");
        return -1;
    }
    if (PyObject_GetBuffer(memory, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if ((uintptr_t)self->view.buf % 8) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "the ring's memory must be 8-byte aligned");
        return -1;
    }
    self->held = 1;
    return 0;
}

static PyObject *ring_release(Ring *self, PyObject *unused) {
    if (self->held) {
        self->held = 0;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static void ring_dealloc(Ring *self) {
    PyTypeObject *type = Py_TYPE(self);
    if (self->held) {
        self->held = 0;
        PyBuffer_Release(&self->view);
    }
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *ring_publish(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t a[6];
    if (ssize_args(args, nargs, 6, a, 1 << 1) < 0) /* argument 1 is the frame */
        return NULL;
    Py_buffer frame;
    if (PyObject_GetBuffer(args[1], &frame, PyBUF_SIMPLE) < 0)
        return NULL;
    char *payload = at(self, a[0], frame.len, 1);
    char *header = payload ? at(self, a[2], 16, 8) : NULL;
    char *peer_sleep = header ? at(self, a[5], 4, 4) : NULL;
    if (!peer_sleep || frame.len > UINT32_MAX || a[3] < 0 || a[3] > UINT32_MAX || a[4] < 0) {
        if (peer_sleep)
            PyErr_SetString(PyExc_ValueError, "frame length, flags or sequence number out of range");
        PyBuffer_Release(&frame);
        return NULL;
    }
    memcpy(payload, frame.buf, (size_t)frame.len);
    uint32_t len = (uint32_t)frame.len, flags = (uint32_t)a[3];
    __atomic_store_n((uint32_t *)header, len, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(header + 4), flags, __ATOMIC_RELAXED);
    __atomic_store_n((uint64_t *)(header + 8), (uint64_t)a[4], __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the store above before the load below (Dekker) */
    uint32_t sleeping = __atomic_load_n((uint32_t *)peer_sleep, __ATOMIC_RELAXED);
    PyBuffer_Release(&frame);
    return PyBool_FromLong(sleeping != 0);
}

static PyObject *ring_spin(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t a[3];
    if (ssize_args(args, nargs, 3, a, 0) < 0)
        return NULL;
    char *word = at(self, a[0], 8, 8);
    if (!word)
        return NULL;
    uint64_t value = (uint64_t)a[1];
    uint64_t start = now_ns(), last = start, budget = a[2] > 0 ? (uint64_t)a[2] : 0;
    int preempted = 0;
    for (;;) {
        for (int i = 0; i < 16; i++) {
            if (__atomic_load_n((uint64_t *)word, __ATOMIC_ACQUIRE) == value)
                return PyLong_FromUnsignedLongLong(now_ns() - start);
            CPU_RELAX();
        }
        uint64_t now = now_ns();
        preempted |= now - last > PREEMPTED_NS;
        last = now;
        if (now - start > budget)
            break;
    }
    return PyLong_FromLong(preempted ? NEEDS_CPU : MISSED);
}

static PyObject *ring_park(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t a[8];
    if (ssize_args(args, nargs, 8, a, 0) < 0)
        return NULL;
    char *mine = at(self, a[0], 4, 4);
    char *word = mine ? at(self, a[1], 8, 8) : NULL;
    char *closed = word ? at(self, a[3], 4, 4) : NULL;
    if (!closed)
        return NULL;
    uint64_t value = (uint64_t)a[2];
    uint32_t *sleep_flag = (uint32_t *)mine;
    __atomic_store_n(sleep_flag, 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* our flag before the peer's sequence number (Dekker) */
    int status;
    if (__atomic_load_n((uint64_t *)word, __ATOMIC_ACQUIRE) == value) {
        status = ARRIVED;
    } else if (__atomic_load_n((uint32_t *)closed, __ATOMIC_ACQUIRE)) {
        status = CLOSED;
    } else {
        struct pollfd fds[2] = {{.fd = (int)a[4], .events = POLLIN}, {.fd = (int)a[5], .events = (short)a[6]}};
        int ready, error;
        Py_BEGIN_ALLOW_THREADS
        ready = poll(fds, 2, (int)a[7]);
        error = errno;
        if (ready > 0 && fds[0].revents & POLLIN) {
            uint64_t count;
            ssize_t got = read(fds[0].fd, &count, sizeof count); /* non-blocking: a race may have drained it */
            (void)got;
        }
        Py_END_ALLOW_THREADS
        if (!self->held) /* released (its channel closed) while we slept: the memory may be gone */
            return PyLong_FromLong(GONE);
        if (ready < 0 && error != EINTR) {
            __atomic_store_n(sleep_flag, 0, __ATOMIC_RELAXED);
            errno = error;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (ready > 0 && (fds[1].revents || fds[0].revents & POLLNVAL)) {
            status = GONE;
        } else if (__atomic_load_n((uint64_t *)word, __ATOMIC_ACQUIRE) == value) {
            status = ARRIVED;
        } else {
            status = AGAIN;
        }
    }
    __atomic_store_n(sleep_flag, 0, __ATOMIC_RELAXED);
    if (status == AGAIN && PyErr_CheckSignals() < 0)
        return NULL; /* a signal handler raised (KeyboardInterrupt): the wait ends with it */
    return PyLong_FromLong(status);
}

static PyMethodDef ring_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))ring_publish, METH_FASTCALL,
     "publish(payload_off, frame, hdr_off, flags, seq, peer_sleep_off) -> peer sleeps"},
    {"spin", (PyCFunction)(void (*)(void))ring_spin, METH_FASTCALL,
     "spin(offset, value, budget_ns) -> ns it took, MISSED or NEEDS_CPU"},
    {"park", (PyCFunction)(void (*)(void))ring_park, METH_FASTCALL,
     "park(sleep_off, offset, value, closed_off, efd, watch_fd, watch_events, timeout_ms) -> status"},
    {"release", (PyCFunction)ring_release, METH_NOARGS, "release the ring's hold on its memory"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ring_slots[] = {
    {Py_tp_doc, "Ring(memory): the hot path of one shared-memory channel (see the module's docstring)."},
    {Py_tp_init, ring_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, ring_dealloc},
    {Py_tp_methods, ring_methods},
    {0, NULL},
};

static PyType_Spec ring_spec = {
    .name = "flexos._ring.Ring",
    .basicsize = sizeof(Ring),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = ring_slots,
};

static int ring_exec(PyObject *module) {
    PyObject *type = PyType_FromModuleAndSpec(module, &ring_spec, NULL);
    if (!type)
        return -1;
    int failed = PyModule_AddObjectRef(module, "Ring", type) < 0;
    Py_DECREF(type);
    if (failed)
        return -1;
    if (PyModule_AddIntConstant(module, "ARRIVED", ARRIVED) < 0 || PyModule_AddIntConstant(module, "CLOSED", CLOSED) < 0 ||
        PyModule_AddIntConstant(module, "GONE", GONE) < 0 || PyModule_AddIntConstant(module, "AGAIN", AGAIN) < 0 ||
        PyModule_AddIntConstant(module, "MISSED", MISSED) < 0 || PyModule_AddIntConstant(module, "NEEDS_CPU", NEEDS_CPU) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, ring_exec},
#ifdef Py_MOD_PER_INTERPRETER_GIL_SUPPORTED
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flexos._ring",
    .m_doc = "The hot path of a shared-memory channel between two processes (see flexos/transports/shm.py).",
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__ring(void) { return PyModuleDef_Init(&module_def); }
