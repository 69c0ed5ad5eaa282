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
 *   route(...) once, then exchange(frame, budget_ns, park_ms) -> bytes | int
 *       a whole round trip of one side: publish (unless frame is None: then only its second
 *       half, waiting for the peer's next frame), wake the peer if it sleeps, then spin (if no
 *       other thread of the process spins) or park, and take a one-fragment reply within the
 *       fast limit. What is left to decide (a miss, a slow spin, fragments, a closed or dead
 *       peer) comes back as an outcome for shm.py's policy; the frame is then not taken. Routed
 *       with hand_over (the peer shares our only CPU), a park after waking the peer first
 *       yields the CPU to it once: one hand-over, never a yield loop. The sequence numbers
 *       and the spin counters live here (out_seq, in_seq, spun, suspicions): shm.py reads
 *       and writes them as attributes.
 *
 * Every offset is checked against the buffer, so a wrong one raises instead of touching memory
 * outside the mapping. The layout itself (what lives at which offset) is shm.py's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
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
enum { MISSED = -1, NEEDS_CPU = -2, NOT_SPUN = -3, PARKED_AGAIN = -4, PEER_CLOSED = -5, PEER_GONE = -6 };

/* A gap this long between two looks at the clock while spinning means we did not run. */
#define PREEMPTED_NS 20000

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int held;
    /* One side's route through the channel, set once by route(): what exchange() uses. */
    int routed;
    char *out_payload, *out_hdr, *in_payload, *in_hdr, *peer_sleep, *my_sleep, *peer_closed;
    Py_ssize_t capacity, fast_limit;
    int peer_efd, my_efd, watch_fd;
    short watch_events;
    int hand_over; /* the peer shares our only CPU: once woken, it gets the CPU before we park */
    /* shm.py's RingChannel state that exchange() keeps itself (read and written there as attributes). */
    unsigned long long out_seq, in_seq; /* the last frame sent, and taken */
    unsigned long long spun;             /* waits that ended while spinning */
    unsigned long long suspicions;       /* spins in a row that found the peer could not run */
} Ring;

/* Threads of this process spinning right now, in any interpreter. A spinning thread holds its
 * GIL, so a second spinner would only keep the first from seeing its reply: one spins at a time. */
static int spinners = 0;

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

/* Poll the u64 at `word` until it is `value`, up to `budget` ns: the ns it took, MISSED or NEEDS_CPU. */
static long long spin_for(uint64_t *word, uint64_t value, uint64_t budget) {
    uint64_t start = now_ns(), last = start;
    int preempted = 0;
    for (;;) {
        for (int i = 0; i < 16; i++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value)
                return (long long)(now_ns() - start);
            CPU_RELAX();
        }
        uint64_t now = now_ns();
        preempted |= now - last > PREEMPTED_NS;
        last = now;
        if (now - start > budget)
            return preempted ? NEEDS_CPU : MISSED;
    }
}

/* Copy the frame into the payload, store its length and flags, then its sequence number (a
 * release store, so the reader that sees it sees the rest), fence, and say whether the peer sleeps. */
static int store_frame(char *payload, char *header, Py_buffer *frame, uint32_t flags, uint64_t seq, char *peer_sleep) {
    memcpy(payload, frame->buf, (size_t)frame->len);
    __atomic_store_n((uint32_t *)header, (uint32_t)frame->len, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(header + 4), flags, __ATOMIC_RELAXED);
    __atomic_store_n((uint64_t *)(header + 8), seq, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the store above before the load below (Dekker) */
    return __atomic_load_n((uint32_t *)peer_sleep, __ATOMIC_RELAXED) != 0;
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
    int sleeping = store_frame(payload, header, &frame, (uint32_t)a[3], (uint64_t)a[4], peer_sleep);
    PyBuffer_Release(&frame);
    return PyBool_FromLong(sleeping);
}

static PyObject *ring_spin(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t a[3];
    if (ssize_args(args, nargs, 3, a, 0) < 0)
        return NULL;
    char *word = at(self, a[0], 8, 8);
    if (!word)
        return NULL;
    return PyLong_FromLongLong(spin_for((uint64_t *)word, (uint64_t)a[1], a[2] > 0 ? (uint64_t)a[2] : 0));
}

/* The sleeping side of the Dekker handshake (park() above): ARRIVED, CLOSED, GONE or AGAIN, or
 * -1 with an exception set. Our flag is clear whenever it returns. */
static int park_once(Ring *self, uint32_t *sleep_flag, uint64_t *word, uint64_t value, uint32_t *closed, int efd,
                     int watch_fd, short watch_events, int timeout_ms) {
    __atomic_store_n(sleep_flag, 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* our flag before the peer's sequence number (Dekker) */
    int status;
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) {
        status = ARRIVED;
    } else if (__atomic_load_n(closed, __ATOMIC_ACQUIRE)) {
        status = CLOSED;
    } else {
        struct pollfd fds[2] = {{.fd = efd, .events = POLLIN}, {.fd = watch_fd, .events = watch_events}};
        int ready, error;
        Py_BEGIN_ALLOW_THREADS
        ready = poll(fds, 2, timeout_ms);
        error = errno;
        if (ready > 0 && fds[0].revents & POLLIN) {
            uint64_t count;
            ssize_t got = read(fds[0].fd, &count, sizeof count); /* non-blocking: a race may have drained it */
            (void)got;
        }
        Py_END_ALLOW_THREADS
        if (!self->held) /* released (its channel closed) while we slept: the memory may be gone */
            return GONE;
        if (ready < 0 && error != EINTR) {
            __atomic_store_n(sleep_flag, 0, __ATOMIC_RELAXED);
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (ready > 0 && (fds[1].revents || fds[0].revents & POLLNVAL)) {
            status = GONE;
        } else if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) {
            status = ARRIVED;
        } else {
            status = AGAIN;
        }
    }
    __atomic_store_n(sleep_flag, 0, __ATOMIC_RELAXED);
    if (status == AGAIN && PyErr_CheckSignals() < 0)
        return -1; /* a signal handler raised (KeyboardInterrupt): the wait ends with it */
    return status;
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
    int status = park_once(self, (uint32_t *)mine, (uint64_t *)word, (uint64_t)a[2], (uint32_t *)closed, (int)a[4],
                           (int)a[5], (short)a[6], (int)a[7]);
    return status < 0 ? NULL : PyLong_FromLong(status);
}

static PyObject *ring_route(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t a[14];
    if (ssize_args(args, nargs, 14, a, 0) < 0)
        return NULL;
    if (self->routed) {
        PyErr_SetString(PyExc_TypeError, "a Ring is routed once");
        return NULL;
    }
    Py_ssize_t capacity = a[12], fast_limit = a[11];
    char *out_payload = at(self, a[0], capacity, 1), *out_hdr = out_payload ? at(self, a[1], 24, 8) : NULL;
    char *in_payload = out_hdr ? at(self, a[2], capacity, 1) : NULL, *in_hdr = in_payload ? at(self, a[3], 24, 8) : NULL;
    char *peer_sleep = in_hdr ? at(self, a[4], 4, 4) : NULL, *my_sleep = peer_sleep ? at(self, a[5], 4, 4) : NULL;
    char *peer_closed = my_sleep ? at(self, a[6], 4, 4) : NULL;
    if (!peer_closed)
        return NULL;
    if (fast_limit < 0 || fast_limit > capacity || capacity > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the fast limit must be within the capacity");
        return NULL;
    }
    self->out_payload = out_payload, self->out_hdr = out_hdr, self->in_payload = in_payload, self->in_hdr = in_hdr;
    self->peer_sleep = peer_sleep, self->my_sleep = my_sleep, self->peer_closed = peer_closed;
    self->peer_efd = (int)a[7], self->my_efd = (int)a[8], self->watch_fd = (int)a[9], self->watch_events = (short)a[10];
    self->fast_limit = fast_limit, self->capacity = capacity, self->hand_over = a[13] != 0;
    self->routed = 1;
    Py_RETURN_NONE;
}

static PyObject *ring_exchange(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t a[3];
    if (ssize_args(args, nargs, 3, a, 1) < 0) /* argument 0 is the frame */
        return NULL;
    Py_ssize_t budget = a[1], park_ms = a[2];
    if (!self->routed || !self->held) {
        PyErr_SetString(PyExc_ValueError, self->held ? "the ring has no route" : "the ring's memory was released");
        return NULL;
    }
    int woke = 0;
    if (args[0] != Py_None) { /* None: nothing to send, only the peer's next frame to wait for */
        Py_buffer frame;
        if (PyObject_GetBuffer(args[0], &frame, PyBUF_SIMPLE) < 0)
            return NULL;
        if (frame.len > self->capacity) {
            PyBuffer_Release(&frame);
            PyErr_SetString(PyExc_ValueError, "frame over the capacity");
            return NULL;
        }
        woke = store_frame(self->out_payload, self->out_hdr, &frame, 0, ++self->out_seq, self->peer_sleep);
        PyBuffer_Release(&frame);
    }
    if (woke) {
        uint64_t one = 1; /* EAGAIN: the peer saturated its counter, so its poll() returns anyway */
        ssize_t wrote = write(self->peer_efd, &one, sizeof one);
        (void)wrote;
    }
    uint64_t *word = (uint64_t *)(self->in_hdr + 8), expected = (uint64_t)self->in_seq + 1;
    long long took = 0;
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != expected) {
        if (budget > 0 && __atomic_load_n(&spinners, __ATOMIC_RELAXED) == 0) {
            __atomic_add_fetch(&spinners, 1, __ATOMIC_RELAXED);
            took = spin_for(word, expected, (uint64_t)budget);
            __atomic_sub_fetch(&spinners, 1, __ATOMIC_RELAXED);
            if (took < 0 || took > budget / 2) /* empty-handed, or it took most of the budget: the caller decides */
                return PyLong_FromLongLong(took);
        } else if (park_ms > 0) {
            /* On one CPU the peer we just woke can only run once we stop: hand it the CPU now.
             * It usually answers before it blocks again, and we find the reply without sleeping
             * (without the poll, the wake-up it would write, and our read of it). */
            if (woke && self->hand_over) {
                Py_BEGIN_ALLOW_THREADS
                sched_yield();
                Py_END_ALLOW_THREADS
                if (!self->held) /* released (its channel closed) meanwhile: the memory may be gone */
                    return PyLong_FromLong(PEER_GONE);
            }
            int status = park_once(self, (uint32_t *)self->my_sleep, word, expected, (uint32_t *)self->peer_closed,
                                   self->my_efd, self->watch_fd, self->watch_events, (int)park_ms);
            if (status < 0)
                return NULL;
            if (status != ARRIVED)
                return PyLong_FromLong(status == CLOSED ? PEER_CLOSED : status == GONE ? PEER_GONE : PARKED_AGAIN);
        } else {
            return PyLong_FromLong(NOT_SPUN);
        }
    }
    uint32_t len = __atomic_load_n((uint32_t *)self->in_hdr, __ATOMIC_RELAXED);
    uint32_t flags = __atomic_load_n((uint32_t *)(self->in_hdr + 4), __ATOMIC_RELAXED);
    if (flags || len > (uint64_t)self->fast_limit) /* fragments, a corrupt header, or over the bound */
        return PyLong_FromLongLong(took);
    PyObject *reply = PyBytes_FromStringAndSize(self->in_payload, (Py_ssize_t)len);
    if (reply) { /* picked up: tells a spinning peer we run */
        __atomic_store_n((uint64_t *)(self->in_hdr + 16), expected, __ATOMIC_RELEASE);
        self->in_seq = expected;
        if (budget > 0) { /* a spinning wait that ended well */
            self->spun++;
            self->suspicions = 0;
        }
    }
    return reply;
}

static PyObject *module_spinners(PyObject *module, PyObject *unused) {
    return PyLong_FromLong(__atomic_load_n(&spinners, __ATOMIC_RELAXED));
}

static PyObject *module_hold_spin(PyObject *module, PyObject *arg) {
    long delta = PyLong_AsLong(arg);
    if (delta == -1 && PyErr_Occurred())
        return NULL;
    if (delta != 1 && delta != -1) {
        PyErr_SetString(PyExc_ValueError, "hold_spin takes 1 (a spin starts) or -1 (it ended)");
        return NULL;
    }
    return PyLong_FromLong(__atomic_add_fetch(&spinners, (int)delta, __ATOMIC_RELAXED));
}

static PyMethodDef ring_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))ring_publish, METH_FASTCALL,
     "publish(payload_off, frame, hdr_off, flags, seq, peer_sleep_off) -> peer sleeps"},
    {"spin", (PyCFunction)(void (*)(void))ring_spin, METH_FASTCALL,
     "spin(offset, value, budget_ns) -> ns it took, MISSED or NEEDS_CPU"},
    {"park", (PyCFunction)(void (*)(void))ring_park, METH_FASTCALL,
     "park(sleep_off, offset, value, closed_off, efd, watch_fd, watch_events, timeout_ms) -> status"},
    {"route", (PyCFunction)(void (*)(void))ring_route, METH_FASTCALL,
     "route(out_payload, out_hdr, in_payload, in_hdr, peer_sleep, my_sleep, peer_closed, peer_efd, my_efd, "
     "watch_fd, watch_events, fast_limit, capacity, hand_over): this side's offsets and fds, once"},
    {"exchange", (PyCFunction)(void (*)(void))ring_exchange, METH_FASTCALL,
     "exchange(frame, budget_ns, park_ms) -> the reply, or an outcome"},
    {"release", (PyCFunction)ring_release, METH_NOARGS, "release the ring's hold on its memory"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef ring_members[] = {
    {"out_seq", Py_T_ULONGLONG, offsetof(Ring, out_seq), 0, "the sequence number of the last frame sent"},
    {"in_seq", Py_T_ULONGLONG, offsetof(Ring, in_seq), 0, "the sequence number of the last frame taken"},
    {"spun", Py_T_ULONGLONG, offsetof(Ring, spun), 0, "waits that ended while spinning"},
    {"suspicions", Py_T_ULONGLONG, offsetof(Ring, suspicions), 0, "spins in a row that found the peer could not run"},
    {NULL},
};

static PyType_Slot ring_slots[] = {
    {Py_tp_members, ring_members},
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
        PyModule_AddIntConstant(module, "MISSED", MISSED) < 0 || PyModule_AddIntConstant(module, "NEEDS_CPU", NEEDS_CPU) < 0 ||
        PyModule_AddIntConstant(module, "NOT_SPUN", NOT_SPUN) < 0 ||
        PyModule_AddIntConstant(module, "PARKED_AGAIN", PARKED_AGAIN) < 0 ||
        PyModule_AddIntConstant(module, "PEER_CLOSED", PEER_CLOSED) < 0 ||
        PyModule_AddIntConstant(module, "PEER_GONE", PEER_GONE) < 0)
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

static PyMethodDef module_methods[] = {
    {"spinners", module_spinners, METH_NOARGS, "spinners() -> threads of this process spinning now"},
    {"hold_spin", module_hold_spin, METH_O, "hold_spin(1 | -1): a spin outside exchange() starts or ends"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_methods = module_methods,
    .m_name = "flexos._ring",
    .m_doc = "The hot path of a shared-memory channel between two processes (see flexos/transports/shm.py).",
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__ring(void) { return PyModuleDef_Init(&module_def); }
