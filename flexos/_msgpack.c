/* The gate protocol's msgpack: the subset of msgpack-python's API the protocol uses.
 *
 * msgpack-python's C extension cannot be loaded into an interpreter with its own GIL (it keeps
 * Python objects in C globals), and its pure-Python fallback makes a gate ~6x slower. This module
 * is per-interpreter safe (all state in module state), avoids keyword parsing on the hot path,
 * and mirrors exactly the options the protocol uses: Packer(default, use_bin_type=True, strict_types=True).pack/reset, packb, and
 * unpackb(data, ext_hook, strict_map_key=False, raw=False). Output is byte-for-byte what
 * msgpack-python produces; tests check both directions against it. Two differences: `lend`, a hook
 * that replaces a large buffer by an ExtType naming memory shared with the peer, and bytearray and
 * memoryview, which go to `default` (so that they can keep their type) unless they are lent.
 *
 * The decoder treats its input as hostile: every length is checked against what is left, and
 * nesting is bounded, so no input can make it read out of bounds or recurse without limit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NEST_LIMIT 511

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buffer;

typedef struct {
    PyObject *ext_type; /* msgpack.ext.ExtType of this interpreter */
    PyTypeObject *packer_type;
    PyObject *kw_ext_hook, *kw_strict_map_key, *kw_raw; /* interned: keywords match by identity */
    PyObject *kind_call, *kind_reply; /* the frame kinds, 1 and 2 */
    PyObject *not_plain;              /* NOT_PLAIN: reply_value's "take the Python path" */
    PyObject *no_releases;            /* an empty list, never given out */
    Buffer frame;                     /* the hot path's frame buffer */
    int frame_busy;                   /* it is being filled */
} ModuleState;

/* -- encoding ------------------------------------------------------------------------------ */

static int grow(Buffer *buf, Py_ssize_t extra);

static inline int
reserve(Buffer *buf, Py_ssize_t extra)
{
    return buf->len + extra <= buf->cap ? 0 : grow(buf, extra);
}

static int
grow(Buffer *buf, Py_ssize_t extra)
{
    Py_ssize_t cap = buf->cap ? buf->cap : 256;
    while (cap < buf->len + extra) {
        cap *= 2;
    }
    char *data = PyMem_Realloc(buf->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buf->data = data;
    buf->cap = cap;
    return 0;
}

static inline int
put(Buffer *buf, const void *bytes, Py_ssize_t n)
{
    if (reserve(buf, n) < 0) {
        return -1;
    }
    memcpy(buf->data + buf->len, bytes, n);
    buf->len += n;
    return 0;
}

/* A type byte followed by an n-byte big-endian number. */
static int
put_be(Buffer *buf, unsigned char type, uint64_t value, int n)
{
    unsigned char out[9];
    out[0] = type;
    for (int i = 0; i < n; i++) {
        out[n - i] = (unsigned char)(value >> (8 * i));
    }
    return put(buf, out, n + 1);
}

static inline int
put_byte(Buffer *buf, unsigned char byte)
{
    if (buf->len < buf->cap) { /* the common case: no call */
        buf->data[buf->len++] = (char)byte;
        return 0;
    }
    return put(buf, &byte, 1);
}

static int
put_length(Buffer *buf, Py_ssize_t n, unsigned char fix, Py_ssize_t fix_max, unsigned char t8,
           unsigned char t16, unsigned char t32)
{
    if (n < fix_max) {
        return put_byte(buf, (unsigned char)(fix | n));
    }
    if (t8 && n < 256) {
        return put_be(buf, t8, (uint64_t)n, 1);
    }
    if (n < 65536) {
        return put_be(buf, t16, (uint64_t)n, 2);
    }
    if ((uint64_t)n <= 0xffffffffULL) {
        return put_be(buf, t32, (uint64_t)n, 4);
    }
    PyErr_SetString(PyExc_ValueError, "object too large to pack");
    return -1;
}

static int
pack_signed(Buffer *buf, long long v)
{
    if (v >= 0) {
        if (v < 128) {
            return put_byte(buf, (unsigned char)v);
        }
        if (v < 256) {
            return put_be(buf, 0xcc, (uint64_t)v, 1);
        }
        if (v < 65536) {
            return put_be(buf, 0xcd, (uint64_t)v, 2);
        }
        if (v <= 0xffffffffLL) {
            return put_be(buf, 0xce, (uint64_t)v, 4);
        }
        return put_be(buf, 0xcf, (uint64_t)v, 8);
    }
    if (v >= -32) {
        return put_byte(buf, (unsigned char)(int8_t)v);
    }
    if (v >= -128) {
        return put_be(buf, 0xd0, (uint64_t)v, 1);
    }
    if (v >= -32768) {
        return put_be(buf, 0xd1, (uint64_t)v, 2);
    }
    if (v >= -2147483648LL) {
        return put_be(buf, 0xd2, (uint64_t)v, 4);
    }
    return put_be(buf, 0xd3, (uint64_t)v, 8);
}

static int
pack_raw(Buffer *buf, const char *data, Py_ssize_t n, int is_str)
{
    int rc = is_str ? put_length(buf, n, 0xa0, 32, 0xd9, 0xda, 0xdb) : put_length(buf, n, 0, 0, 0xc4, 0xc5, 0xc6);
    return rc < 0 ? -1 : put(buf, data, n);
}

/* Large buffers may be handed to `lend` (which returns an ExtType to pack in their place). */
typedef struct {
    PyObject *fallback;
    PyObject *lend;
    Py_ssize_t lend_threshold;
} Hooks;

static int pack_object(ModuleState *state, Buffer *buf, PyObject *obj, const Hooks *hooks, int depth);
static int pack_native(ModuleState *state, Buffer *buf, PyObject *obj, const Hooks *hooks, int depth);

static int
pack_ext(ModuleState *state, Buffer *buf, PyObject *ext)
{
    PyObject *code_obj = PyTuple_GET_ITEM(ext, 0);
    PyObject *data_obj = PyTuple_GET_ITEM(ext, 1);
    long code = PyLong_AsLong(code_obj);
    if (code == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (code < -128 || code > 127 || !PyBytes_Check(data_obj)) {
        PyErr_SetString(PyExc_ValueError, "ExtType needs a code in -128..127 and bytes data");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data_obj);
    int rc;
    switch (n) {
    case 1: rc = put_byte(buf, 0xd4); break;
    case 2: rc = put_byte(buf, 0xd5); break;
    case 4: rc = put_byte(buf, 0xd6); break;
    case 8: rc = put_byte(buf, 0xd7); break;
    case 16: rc = put_byte(buf, 0xd8); break;
    default:
        if (n < 256) {
            rc = put_be(buf, 0xc7, (uint64_t)n, 1);
        }
        else if (n < 65536) {
            rc = put_be(buf, 0xc8, (uint64_t)n, 2);
        }
        else if ((uint64_t)n <= 0xffffffffULL) {
            rc = put_be(buf, 0xc9, (uint64_t)n, 4);
        }
        else {
            PyErr_SetString(PyExc_ValueError, "ExtType data too large");
            rc = -1;
        }
    }
    if (rc < 0 || put_byte(buf, (unsigned char)(int8_t)code) < 0) {
        return -1;
    }
    return put(buf, PyBytes_AS_STRING(data_obj), n);
}

static int
lend_or_pack(ModuleState *state, Buffer *buf, PyObject *obj, const char *data, Py_ssize_t n, const Hooks *hooks)
{
    if (hooks->lend == NULL || hooks->lend == Py_None || n < hooks->lend_threshold) {
        return pack_raw(buf, data, n, 0);
    }
    PyObject *ext = PyObject_CallOneArg(hooks->lend, obj);
    if (ext == NULL) {
        return -1;
    }
    int rc;
    if (Py_IS_TYPE(ext, (PyTypeObject *)state->ext_type) && PyTuple_GET_SIZE(ext) == 2) {
        rc = pack_ext(state, buf, ext);
    }
    else {
        PyErr_SetString(PyExc_TypeError, "lend() must return an ExtType");
        rc = -1;
    }
    Py_DECREF(ext);
    return rc;
}

/* Packs `obj` if msgpack has a type for it: 0 done, -1 error, 1 not a msgpack type. */
static int
pack_native(ModuleState *state, Buffer *buf, PyObject *obj, const Hooks *hooks, int depth)
{
    if (obj == Py_None) {
        return put_byte(buf, 0xc0);
    }
    if (obj == Py_True || obj == Py_False) {
        return put_byte(buf, obj == Py_True ? 0xc3 : 0xc2);
    }
    if (PyLong_CheckExact(obj)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (overflow == 0) {
            return v == -1 && PyErr_Occurred() ? -1 : pack_signed(buf, v);
        }
        unsigned long long u = overflow > 0 ? PyLong_AsUnsignedLongLong(obj) : 0;
        if (overflow > 0 && !PyErr_Occurred()) {
            return put_be(buf, 0xcf, u, 8);
        }
        PyErr_Clear();
        return 1; /* beyond 64 bits: the `default` hook's business */
    }
    if (PyFloat_CheckExact(obj)) {
        double d = PyFloat_AS_DOUBLE(obj);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return put_be(buf, 0xcb, bits, 8);
    }
    if (PyUnicode_CheckExact(obj)) {
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(obj, &n);
        if (utf8 == NULL && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            PyErr_Clear();
            return 1; /* lone surrogates, which UTF-8 cannot hold (msgpack raises): `default`'s business */
        }
        return utf8 == NULL ? -1 : pack_raw(buf, utf8, n, 1);
    }
    if (PyBytes_CheckExact(obj)) {
        return lend_or_pack(state, buf, obj, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), hooks);
    }
    /* bytearray and memoryview keep their type across a gate: lent when large, else packed by
       `default` (msgpack-python packs both as bin, so they would arrive as bytes). */
    if (PyByteArray_CheckExact(obj)) {
        if (hooks->lend == NULL || hooks->lend == Py_None || PyByteArray_GET_SIZE(obj) < hooks->lend_threshold) {
            return 1;
        }
        return lend_or_pack(state, buf, obj, PyByteArray_AS_STRING(obj), PyByteArray_GET_SIZE(obj), hooks);
    }
    if (Py_IS_TYPE(obj, &PyMemoryView_Type)) {
        Py_buffer view;
        if (hooks->lend == NULL || hooks->lend == Py_None) {
            return 1;
        }
        if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
            if (PyErr_ExceptionMatches(PyExc_BufferError)) {
                PyErr_Clear();
                return 1; /* not contiguous (msgpack raises): `default`'s business */
            }
            return -1;
        }
        int rc = view.len < hooks->lend_threshold ? 1 : lend_or_pack(state, buf, obj, view.buf, view.len, hooks);
        PyBuffer_Release(&view);
        return rc;
    }
    if (PyList_CheckExact(obj)) {
        Py_ssize_t n = PyList_GET_SIZE(obj);
        int rc = put_length(buf, n, 0x90, 16, 0, 0xdc, 0xdd);
        for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
            if (i >= PyList_GET_SIZE(obj)) {
                PyErr_SetString(PyExc_RuntimeError, "list changed size while it was packed");
                return -1;
            }
            PyObject *item = Py_NewRef(PyList_GET_ITEM(obj, i)); /* `default` may change the list */
            rc = pack_object(state, buf, item, hooks, depth + 1);
            Py_DECREF(item);
        }
        return rc;
    }
    if (PyDict_CheckExact(obj)) {
        int rc = put_length(buf, PyDict_GET_SIZE(obj), 0x80, 16, 0, 0xde, 0xdf);
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (rc == 0 && PyDict_Next(obj, &pos, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value); /* `default` may change the dict */
            rc = pack_object(state, buf, key, hooks, depth + 1);
            if (rc == 0) {
                rc = pack_object(state, buf, value, hooks, depth + 1);
            }
            Py_DECREF(key);
            Py_DECREF(value);
        }
        return rc;
    }
    if (Py_IS_TYPE(obj, (PyTypeObject *)state->ext_type) && PyTuple_GET_SIZE(obj) == 2) {
        return pack_ext(state, buf, obj);
    }
    return 1;
}

/* msgpack's types, else what `default` returns for it (once: its answer must be packable). */
static int
pack_object(ModuleState *state, Buffer *buf, PyObject *obj, const Hooks *hooks, int depth)
{
    if (depth > NEST_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "recursion limit exceeded.");
        return -1;
    }
    int rc = pack_native(state, buf, obj, hooks, depth);
    if (rc <= 0) {
        return rc;
    }
    PyObject *replacement = NULL;
    if (hooks->fallback != NULL && hooks->fallback != Py_None) {
        replacement = PyObject_CallOneArg(hooks->fallback, obj);
        if (replacement == NULL) {
            return -1;
        }
        rc = pack_native(state, buf, replacement, hooks, depth);
    }
    if (rc == 1) {
        PyErr_Format(PyExc_TypeError, "can not serialize '%.200s' object",
                     Py_TYPE(replacement ? replacement : obj)->tp_name);
        rc = -1;
    }
    Py_XDECREF(replacement);
    return rc;
}

static int
check_fixed_options(PyObject *use_bin_type, PyObject *strict_types)
{
    if ((use_bin_type && !PyObject_IsTrue(use_bin_type)) || (strict_types && !PyObject_IsTrue(strict_types))) {
        PyErr_SetString(PyExc_ValueError, "flexos._msgpack supports only use_bin_type=True, strict_types=True");
        return -1;
    }
    return 0;
}

static PyObject *
packb(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"o", "default", "use_bin_type", "strict_types", "lend", "lend_threshold", NULL};
    PyObject *obj, *use_bin_type = NULL, *strict_types = NULL;
    Hooks hooks = {NULL, NULL, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OOOOn:packb", keywords, &obj, &hooks.fallback, &use_bin_type,
                                     &strict_types, &hooks.lend, &hooks.lend_threshold) ||
        check_fixed_options(use_bin_type, strict_types) < 0) {
        return NULL;
    }
    Buffer buf = {NULL, 0, 0};
    PyObject *result = NULL;
    if (pack_object(PyModule_GetState(module), &buf, obj, &hooks, 0) == 0) {
        result = PyBytes_FromStringAndSize(buf.data, buf.len);
    }
    PyMem_Free(buf.data);
    return result;
}

/* A reusable packer, as msgpack.Packer: keeps its buffer between calls. */
typedef struct {
    PyObject_HEAD
    Hooks hooks;
    Buffer buf;
    int busy;
} Packer;

static int
packer_init(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"default", "use_bin_type", "strict_types", "lend", "lend_threshold", NULL};
    PyObject *fallback = NULL, *use_bin_type = NULL, *strict_types = NULL, *lend = NULL;
    Py_ssize_t lend_threshold = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOOn:Packer", keywords, &fallback, &use_bin_type,
                                     &strict_types, &lend, &lend_threshold) ||
        check_fixed_options(use_bin_type, strict_types) < 0) {
        return -1;
    }
    Packer *packer = (Packer *)self;
    Py_XSETREF(packer->hooks.fallback, Py_XNewRef(fallback));
    Py_XSETREF(packer->hooks.lend, Py_XNewRef(lend));
    packer->hooks.lend_threshold = lend_threshold;
    return 0;
}

static PyObject *
packer_pack(PyObject *self, PyObject *obj)
{
    Packer *packer = (Packer *)self;
    ModuleState *state = PyType_GetModuleState(Py_TYPE(self));
    if (state == NULL) {
        return NULL;
    }
    Buffer local = {NULL, 0, 0};
    Buffer *buf = packer->busy ? &local : &packer->buf; /* re-entered from `default`: own buffer */
    int was_busy = packer->busy;
    packer->busy = 1;
    buf->len = 0;
    PyObject *result = NULL;
    if (pack_object(state, buf, obj, &packer->hooks, 0) == 0) {
        result = PyBytes_FromStringAndSize(buf->data, buf->len);
    }
    buf->len = 0;
    packer->busy = was_busy;
    PyMem_Free(local.data);
    if (buf == &packer->buf && packer->buf.cap > (1 << 20)) { /* do not pin a huge buffer */
        PyMem_Free(packer->buf.data);
        packer->buf.data = NULL;
        packer->buf.cap = 0;
    }
    return result;
}

static PyObject *
packer_reset(PyObject *self, PyObject *unused)
{
    ((Packer *)self)->buf.len = 0;
    Py_RETURN_NONE;
}

static int
packer_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((Packer *)self)->hooks.fallback);
    Py_VISIT(((Packer *)self)->hooks.lend);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
packer_clear(PyObject *self)
{
    Py_CLEAR(((Packer *)self)->hooks.fallback);
    Py_CLEAR(((Packer *)self)->hooks.lend);
    return 0;
}

static void
packer_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    packer_clear(self);
    PyMem_Free(((Packer *)self)->buf.data);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyMethodDef packer_methods[] = {
    {"pack", packer_pack, METH_O, "pack(obj) -> bytes"},
    {"reset", packer_reset, METH_NOARGS, "forget any partial output"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot packer_slots[] = {
    {Py_tp_init, packer_init},
    {Py_tp_methods, packer_methods},
    {Py_tp_traverse, packer_traverse},
    {Py_tp_clear, packer_clear},
    {Py_tp_dealloc, packer_dealloc},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec packer_spec = {
    .name = "flexos._msgpack.Packer",
    .basicsize = sizeof(Packer),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = packer_slots,
};

/* -- decoding ------------------------------------------------------------------------------ */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    PyObject *ext_hook;
    ModuleState *state;
    int plain_only; /* an extension value is refused (the hot path's decoders) */
} Reader;

static int
need(Reader *r, Py_ssize_t n)
{
    if (n < 0 || r->end - r->p < n) {
        PyErr_SetString(PyExc_ValueError, "Unpack failed: incomplete input");
        return -1;
    }
    return 0;
}

static uint64_t
read_be(Reader *r, int n)
{
    uint64_t value = 0;
    for (int i = 0; i < n; i++) {
        value = (value << 8) | r->p[i];
    }
    r->p += n;
    return value;
}

static PyObject *unpack_object(Reader *r, int depth);

static PyObject *
unpack_array(Reader *r, Py_ssize_t n, int depth)
{
    if (need(r, n) < 0) { /* each element takes at least one byte */
        return NULL;
    }
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list != NULL && i < n; i++) {
        PyObject *item = unpack_object(r, depth + 1);
        if (item == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *
unpack_map(Reader *r, Py_ssize_t n, int depth)
{
    if (need(r, 2 * n) < 0) {
        return NULL;
    }
    PyObject *dict = PyDict_New();
    for (Py_ssize_t i = 0; dict != NULL && i < n; i++) {
        PyObject *key = unpack_object(r, depth + 1);
        PyObject *value = key ? unpack_object(r, depth + 1) : NULL;
        if (value == NULL || PyDict_SetItem(dict, key, value) < 0) {
            Py_CLEAR(dict);
        }
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    return dict;
}

static PyObject *
unpack_ext(Reader *r, Py_ssize_t n)
{
    if (need(r, n + 1) < 0) {
        return NULL;
    }
    if (r->plain_only) {
        PyErr_SetString(PyExc_ValueError, "not a plain value");
        return NULL;
    }
    int code = (int8_t)*r->p++;
    PyObject *data = PyBytes_FromStringAndSize((const char *)r->p, n);
    r->p += n;
    if (data == NULL) {
        return NULL;
    }
    PyObject *result;
    if (r->ext_hook != NULL && r->ext_hook != Py_None) {
        result = PyObject_CallFunction(r->ext_hook, "iO", code, data);
    }
    else {
        result = PyObject_CallFunction(r->state->ext_type, "iO", code, data);
    }
    Py_DECREF(data);
    return result;
}

static PyObject *
unpack_raw(Reader *r, Py_ssize_t n, int is_str)
{
    if (need(r, n) < 0) {
        return NULL;
    }
    const char *start = (const char *)r->p;
    r->p += n;
    return is_str ? PyUnicode_DecodeUTF8(start, n, "strict") : PyBytes_FromStringAndSize(start, n);
}

static PyObject *
unpack_object(Reader *r, int depth)
{
    if (depth > NEST_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "Unpack failed: nested too deeply");
        return NULL;
    }
    if (need(r, 1) < 0) {
        return NULL;
    }
    unsigned char c = *r->p++;
    if (c <= 0x7f) {
        return PyLong_FromLong(c);
    }
    if (c >= 0xe0) {
        return PyLong_FromLong((int8_t)c);
    }
    if (c <= 0x8f) {
        return unpack_map(r, c & 0x0f, depth);
    }
    if (c <= 0x9f) {
        return unpack_array(r, c & 0x0f, depth);
    }
    if (c <= 0xbf) {
        return unpack_raw(r, c & 0x1f, 1);
    }
    static const int width[] = {
        /* c0 */ 0, 0, 0, 0, 1, 2, 4, 1, 2, 4, 4, 8, 1, 2, 4, 8,
        /* d0 */ 1, 2, 4, 8, 0, 0, 0, 0, 0, 1, 2, 4, 2, 4, 2, 4,
    };
    int n = width[c - 0xc0];
    if (need(r, n) < 0) {
        return NULL;
    }
    switch (c) {
    case 0xc0: Py_RETURN_NONE;
    case 0xc2: Py_RETURN_FALSE;
    case 0xc3: Py_RETURN_TRUE;
    case 0xc4: case 0xc5: case 0xc6: return unpack_raw(r, (Py_ssize_t)read_be(r, n), 0);
    case 0xc7: case 0xc8: case 0xc9: return unpack_ext(r, (Py_ssize_t)read_be(r, n));
    case 0xca: {
        uint32_t bits = (uint32_t)read_be(r, 4);
        float f;
        memcpy(&f, &bits, 4);
        return PyFloat_FromDouble(f);
    }
    case 0xcb: {
        uint64_t bits = read_be(r, 8);
        double d;
        memcpy(&d, &bits, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xcc: case 0xcd: case 0xce: case 0xcf: return PyLong_FromUnsignedLongLong(read_be(r, n));
    case 0xd0: return PyLong_FromLong((int8_t)read_be(r, 1));
    case 0xd1: return PyLong_FromLong((int16_t)read_be(r, 2));
    case 0xd2: return PyLong_FromLong((int32_t)read_be(r, 4));
    case 0xd3: return PyLong_FromLongLong((int64_t)read_be(r, 8));
    case 0xd4: return unpack_ext(r, 1);
    case 0xd5: return unpack_ext(r, 2);
    case 0xd6: return unpack_ext(r, 4);
    case 0xd7: return unpack_ext(r, 8);
    case 0xd8: return unpack_ext(r, 16);
    case 0xd9: case 0xda: case 0xdb: return unpack_raw(r, (Py_ssize_t)read_be(r, n), 1);
    case 0xdc: case 0xdd: return unpack_array(r, (Py_ssize_t)read_be(r, n), depth);
    case 0xde: case 0xdf: return unpack_map(r, (Py_ssize_t)read_be(r, n), depth);
    default:
        return PyErr_Format(PyExc_ValueError, "Unpack failed: unknown type byte 0x%02x", c);
    }
}

/* unpackb(packed, *, ext_hook=None, strict_map_key=False, raw=False): vectorcall, because a
 * gate decodes two frames per call and keyword parsing would cost as much as the decoding. */
static PyObject *
unpackb(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 1) {
        return PyErr_Format(PyExc_TypeError, "unpackb() takes one positional argument");
    }
    ModuleState *state = PyModule_GetState(module);
    PyObject *ext_hook = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
        int is_hook = key == state->kw_ext_hook;
        int is_flag = key == state->kw_strict_map_key || key == state->kw_raw;
        if (!is_hook && !is_flag) { /* not interned: compare the text */
            is_hook = PyUnicode_CompareWithASCIIString(key, "ext_hook") == 0;
            is_flag = PyUnicode_CompareWithASCIIString(key, "strict_map_key") == 0 ||
                      PyUnicode_CompareWithASCIIString(key, "raw") == 0;
        }
        if (is_hook) {
            ext_hook = value;
        }
        else if (is_flag) {
            int truth = PyObject_IsTrue(value);
            if (truth != 0) {
                return truth < 0 ? NULL
                                 : PyErr_Format(PyExc_ValueError,
                                                "flexos._msgpack supports only strict_map_key=False, raw=False");
            }
        }
        else {
            return PyErr_Format(PyExc_TypeError, "unpackb() got an unexpected keyword argument %R", key);
        }
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Reader reader = {data.buf, (const unsigned char *)data.buf + data.len, ext_hook, state, 0};
    PyObject *result = unpack_object(&reader, 0);
    if (result != NULL && reader.p != reader.end) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "Unpack failed: extra data after the value");
    }
    PyBuffer_Release(&data);
    return result;
}

/* -- the gate's hot path: frames of plain values ------------------------------------------
 *
 * A gate call of the common shape (a few arguments of builtin types, a handle target, no
 * releases) costs more in the Python that builds and takes apart its frames than in msgpack. These
 * functions do that in C for frames whose values are all *plain*: None, bool, int within 64 bits,
 * float, str that UTF-8 can hold, bytes below the lending threshold, and lists and dicts of them,
 * at most PLAIN_DEPTH deep. For such values the Python path never calls its `default` hook (or its
 * ext_hook, when decoding), so its bytes and its decisions are exactly these. Anything else is
 * not refused here: the functions answer "not plain" (None, or NOT_PLAIN) and the caller takes
 * the Python path, which makes the decision (and raises the error) it always made. */

#define PLAIN_DEPTH 16

static const Hooks no_hooks = {NULL, NULL, 0};

/* 0 packed, 1 not plain (nothing is promised about `buf` then), -1 error. */
static int
pack_plain(ModuleState *state, Buffer *buf, PyObject *obj, Py_ssize_t raw_limit, int depth)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == &PyList_Type) {
        if (depth >= PLAIN_DEPTH) {
            return 1;
        }
        Py_ssize_t n = PyList_GET_SIZE(obj);
        int rc = put_length(buf, n, 0x90, 16, 0, 0xdc, 0xdd);
        for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
            if (i >= PyList_GET_SIZE(obj)) {
                return 1; /* changed under us (a GC callback): the Python path decides */
            }
            PyObject *item = Py_NewRef(PyList_GET_ITEM(obj, i));
            rc = pack_plain(state, buf, item, raw_limit, depth + 1);
            Py_DECREF(item);
        }
        return rc;
    }
    if (type == &PyDict_Type) {
        if (depth >= PLAIN_DEPTH) {
            return 1;
        }
        Py_ssize_t n = PyDict_GET_SIZE(obj);
        int rc = put_length(buf, n, 0x80, 16, 0, 0xde, 0xdf);
        PyObject *key, *value;
        Py_ssize_t pos = 0, seen = 0;
        while (rc == 0 && PyDict_Next(obj, &pos, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value);
            rc = pack_plain(state, buf, key, raw_limit, depth + 1);
            if (rc == 0) {
                rc = pack_plain(state, buf, value, raw_limit, depth + 1);
            }
            Py_DECREF(key);
            Py_DECREF(value);
            seen++;
        }
        return rc == 0 && (seen != n || PyDict_GET_SIZE(obj) != n) ? 1 : rc;
    }
    if (type == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(obj);
        return n >= raw_limit ? 1 : pack_raw(buf, PyBytes_AS_STRING(obj), n, 0);
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (type == &PyLong_Type && PyUnstable_Long_IsCompact((PyLongObject *)obj)) { /* no overflow check needed */
        return pack_signed(buf, (long long)PyUnstable_Long_CompactValue((PyLongObject *)obj));
    }
#endif
    if (type == &PyUnicode_Type && PyUnicode_IS_COMPACT_ASCII(obj)) { /* its UTF-8 is its data */
        return pack_raw(buf, (const char *)PyUnicode_DATA(obj), PyUnicode_GET_LENGTH(obj), 1);
    }
    if (obj == Py_None || type == &PyBool_Type || type == &PyLong_Type || type == &PyFloat_Type ||
        type == &PyUnicode_Type) {
        return pack_native(state, buf, obj, &no_hooks, depth);
    }
    return 1;
}

/* Packs frame items into the module's frame buffer (plain packing runs no Python code, so it is
 * never re-entered): bytes, None if an item is not plain, NULL on error. `spread`, if not NULL,
 * is a non-empty tuple packed, as a list, in place of item `spread_at`. */
static PyObject *
plain_items(ModuleState *state, PyObject *const *items, Py_ssize_t n, PyObject *spread, Py_ssize_t spread_at,
            Py_ssize_t raw_limit)
{
    if (state->frame_busy) { /* re-entered (a finalizer run by an allocation here): the Python path */
        Py_RETURN_NONE;
    }
    state->frame_busy = 1;
    Buffer *buf = &state->frame;
    buf->len = 0;
    int rc = put_byte(buf, (unsigned char)(0x90 | n));
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        if (spread != NULL && i == spread_at) {
            Py_ssize_t count = PyTuple_GET_SIZE(spread);
            rc = put_length(buf, count, 0x90, 16, 0, 0xdc, 0xdd);
            for (Py_ssize_t j = 0; rc == 0 && j < count; j++) {
                rc = pack_plain(state, buf, PyTuple_GET_ITEM(spread, j), raw_limit, 2);
            }
        }
        else {
            rc = pack_plain(state, buf, items[i], raw_limit, 1);
        }
    }
    PyObject *result = rc == 0 ? PyBytes_FromStringAndSize(buf->data, buf->len) : NULL;
    buf->len = 0;
    if (buf->cap > (1 << 16)) { /* do not pin a large buffer */
        PyMem_Free(buf->data);
        buf->data = NULL;
        buf->cap = 0;
    }
    state->frame_busy = 0;
    /* Not plain, or too large for msgpack (ValueError, which the codec's packer answers with its
       graph retry and its own error): the Python path decides. */
    if (rc == 1 || (rc < 0 && PyErr_ExceptionMatches(PyExc_ValueError))) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return result;
}

static int
raw_limit_of(PyObject *obj, Py_ssize_t *limit)
{
    *limit = PyLong_AsSsize_t(obj);
    return *limit == -1 && PyErr_Occurred() ? -1 : 0;
}

/* call_frame(op, target, name, args, kwargs, releases, raw_limit) -> bytes | None: the CALL frame
 * frames.encode_call makes, [1, op, target, name, list(args) or nil, kwargs or nil, releases], if
 * it holds only plain values; `args` a tuple or list, `kwargs` a dict or None. */
static PyObject *
call_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        return PyErr_Format(PyExc_TypeError, "call_frame() takes 7 arguments");
    }
    Py_ssize_t raw_limit;
    if (raw_limit_of(args[6], &raw_limit) < 0) {
        return NULL;
    }
    PyObject *call_args = args[3], *kwargs = args[4], *spread = NULL;
    ModuleState *state = PyModule_GetState(module);
    PyObject *items[7] = {state->kind_call, args[0], args[1], args[2], Py_None, Py_None, args[5]};
    if (PyTuple_CheckExact(call_args)) {
        spread = PyTuple_GET_SIZE(call_args) ? call_args : NULL;
    }
    else if (PyList_CheckExact(call_args)) {
        items[4] = PyList_GET_SIZE(call_args) ? call_args : Py_None;
    }
    else {
        Py_RETURN_NONE; /* any other iterable: the Python path makes its list */
    }
    if (PyDict_CheckExact(kwargs)) {
        items[5] = PyDict_GET_SIZE(kwargs) ? kwargs : Py_None;
    }
    else if (kwargs != Py_None) {
        Py_RETURN_NONE;
    }
    return plain_items(state, items, 7, spread, 4, raw_limit);
}

/* reply_frame(value, releases, raw_limit) -> bytes | None: frames.encode_reply's REPLY frame,
 * if it holds only plain values. */
static PyObject *
reply_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        return PyErr_Format(PyExc_TypeError, "reply_frame() takes 3 arguments");
    }
    Py_ssize_t raw_limit;
    if (raw_limit_of(args[2], &raw_limit) < 0) {
        return NULL;
    }
    ModuleState *state = PyModule_GetState(module);
    PyObject *items[3] = {state->kind_reply, args[0], args[1]};
    return plain_items(state, items, 3, NULL, 0, raw_limit);
}

/* reply_value(frame) -> value | NOT_PLAIN: the value of a REPLY frame [2, value, []] whose value
 * is plain, as frames.decode_frame returns it; NOT_PLAIN for any other frame, malformed ones
 * included (decode_frame then refuses them, as it always did). */
static PyObject *
reply_value(PyObject *module, PyObject *frame)
{
    ModuleState *state = PyModule_GetState(module);
    if (!PyBytes_CheckExact(frame)) {
        return Py_NewRef(state->not_plain);
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(frame);
    Py_ssize_t n = PyBytes_GET_SIZE(frame);
    if (n < 4 || data[0] != 0x93 || data[1] != 0x02 || data[n - 1] != 0x90) {
        return Py_NewRef(state->not_plain);
    }
    Reader reader = {data + 2, data + n - 1, NULL, state, 1};
    PyObject *value = unpack_object(&reader, 1);
    if (value == NULL || reader.p != reader.end) {
        Py_XDECREF(value);
        PyErr_Clear(); /* any failure: decode_frame decides, and raises what it raises */
        return Py_NewRef(state->not_plain);
    }
    return value;
}

/* A release list as frames._check_releases accepts it: a list of [handle, count] pairs of ints. */
static int
valid_releases(PyObject *releases)
{
    if (!PyList_CheckExact(releases)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(releases); i++) {
        PyObject *pair = PyList_GET_ITEM(releases, i);
        if (!PyList_CheckExact(pair) || PyList_GET_SIZE(pair) != 2 || !PyLong_CheckExact(PyList_GET_ITEM(pair, 0)) ||
            !PyLong_CheckExact(PyList_GET_ITEM(pair, 1))) {
            return 0;
        }
    }
    return 1;
}

/* The fields of a CALL frame [1, op, target, name, args, kwargs, releases] of plain values that
 * frames.decode_frame would accept, as it gives them (absent args as (), absent kwargs as
 * `no_kwargs`), into `fields` (new references), and its releases into `*releases` (a new
 * reference, or NULL when there are none): 0; 1 for any other frame, malformed ones included
 * (nothing is set then, and no error). */
static int
decode_call(ModuleState *state, PyObject *frame, PyObject *no_kwargs, PyObject **fields, long *op_out,
            PyObject **releases)
{
    if (!PyBytes_CheckExact(frame)) {
        return 1;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(frame);
    Py_ssize_t n = PyBytes_GET_SIZE(frame);
    if (n < 8 || data[0] != 0x97 || data[1] != 0x01) {
        return 1;
    }
    Reader reader = {data + 2, data + n, NULL, state, 1};
    *releases = NULL;
    for (int i = 0; i < 5; i++) {
        fields[i] = NULL;
    }
    for (int i = 0; i < 5; i++) {
        fields[i] = unpack_object(&reader, 1);
        if (fields[i] == NULL) {
            goto not_plain;
        }
    }
    if (reader.p + 1 == reader.end && *reader.p == 0x90) {
        reader.p++; /* no releases, the common case */
    }
    else {
        *releases = unpack_object(&reader, 1);
        if (*releases == NULL || !valid_releases(*releases)) {
            goto not_plain;
        }
        if (PyList_GET_SIZE(*releases) == 0) {
            Py_CLEAR(*releases);
        }
    }
    if (reader.p != reader.end) {
        goto not_plain;
    }
    PyObject *op = fields[0], *target = fields[1], *name = fields[2], *call_args = fields[3], *kwargs = fields[4];
    if (!PyLong_CheckExact(op)) {
        goto not_plain;
    }
    long op_value = PyLong_AsLong(op);
    /* Op.IMPORT .. Op.UNPICKLE, as flexos/wire/frames.py's _OPS */
    if (op_value < 1 || op_value > 11 || !(PyLong_CheckExact(target) || PyUnicode_CheckExact(target)) ||
        !(name == Py_None || PyUnicode_CheckExact(name))) {
        goto not_plain;
    }
    if (call_args == Py_None) {
        Py_SETREF(fields[3], PyTuple_New(0));
        if (fields[3] == NULL) {
            goto not_plain;
        }
    }
    else if (!PyList_CheckExact(call_args)) {
        goto not_plain;
    }
    if (kwargs == Py_None) {
        Py_SETREF(fields[4], Py_NewRef(no_kwargs));
    }
    else if (PyDict_CheckExact(kwargs)) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwargs, &pos, &key, &value)) {
            if (!PyUnicode_CheckExact(key)) {
                goto not_plain;
            }
        }
    }
    else {
        goto not_plain;
    }
    *op_out = op_value;
    return 0;
not_plain:
    for (int i = 0; i < 5; i++) {
        Py_CLEAR(fields[i]);
    }
    Py_CLEAR(*releases);
    PyErr_Clear(); /* any failure: decode_frame decides, and raises what it raises */
    return 1;
}

/* The fields as a tuple (op, target, name, args, kwargs), with the releases as a sixth item when
 * there are some; steals every reference. */
static PyObject *
parts_tuple(PyObject **fields, PyObject *releases)
{
    Py_ssize_t size = releases == NULL ? 5 : 6;
    PyObject *parts = PyTuple_New(size);
    for (int i = 0; i < 5; i++) {
        if (parts != NULL) {
            PyTuple_SET_ITEM(parts, i, fields[i]);
        }
        else {
            Py_DECREF(fields[i]);
        }
    }
    if (releases != NULL) {
        if (parts != NULL) {
            PyTuple_SET_ITEM(parts, 5, releases);
        }
        else {
            Py_DECREF(releases);
        }
    }
    return parts;
}

/* call_parts(frame, no_kwargs) -> (op, target, name, args, kwargs[, releases]) | None: decode_call's
 * fields, and the releases when there are some. */
static PyObject *
call_parts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        return PyErr_Format(PyExc_TypeError, "call_parts() takes 2 arguments");
    }
    PyObject *fields[5], *releases;
    long op;
    if (decode_call(PyModule_GetState(module), args[0], args[1], fields, &op, &releases)) {
        Py_RETURN_NONE;
    }
    return parts_tuple(fields, releases);
}

/* serve_call(frame, objects, no_kwargs, dying, raw_limit): Link.dispatch's common case. For a plain
 * CALL frame (decode_call) of op CALL naming a handle in `objects` (handle -> [object, count]),
 * calls the object as Link._execute does, obj(*args, **kwargs), and answers its REPLY frame
 * (bytes); or (result,) when that is not plain, or releases wait in `dying`, for the caller to
 * encode; the object's exception propagates. For another plain CALL frame, or one that carries
 * releases (which the link applies before or after the call, as it decides): its fields, as
 * call_parts (nothing was run); None for any frame that is not plain (nothing was run). `objects`
 * None: never call, give the fields. */
static PyObject *
serve_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        return PyErr_Format(PyExc_TypeError, "serve_call() takes 5 arguments");
    }
    Py_ssize_t raw_limit;
    if (raw_limit_of(args[4], &raw_limit) < 0) {
        return NULL;
    }
    ModuleState *state = PyModule_GetState(module);
    PyObject *fields[5], *objects = args[1], *releases;
    long op;
    if (decode_call(state, args[0], args[2], fields, &op, &releases)) {
        Py_RETURN_NONE;
    }
    if (releases != NULL) {
        return parts_tuple(fields, releases);
    }
    PyObject *entry = NULL;
    if (op == 5 && PyLong_CheckExact(fields[1]) && PyDict_CheckExact(objects)) {
        entry = PyDict_GetItemWithError(objects, fields[1]); /* borrowed; an int's hash runs no code */
        if (entry == NULL && PyErr_Occurred()) {
            PyErr_Clear();
        }
    }
    if (entry == NULL || !PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < 1) {
        return parts_tuple(fields, NULL); /* Link._execute decides */
    }
    PyObject *callee = Py_NewRef(PyList_GET_ITEM(entry, 0));
    PyObject *call_args = fields[3], *kwargs = fields[4];
    PyObject *arg_tuple = PyTuple_CheckExact(call_args) ? Py_NewRef(call_args) : PyList_AsTuple(call_args);
    PyObject *result = NULL;
    if (arg_tuple != NULL) {
        result = PyObject_Call(callee, arg_tuple, PyDict_GET_SIZE(kwargs) ? kwargs : NULL);
        Py_DECREF(arg_tuple);
    }
    Py_DECREF(callee);
    for (int i = 0; i < 5; i++) {
        Py_DECREF(fields[i]);
    }
    if (result == NULL) {
        return NULL;
    }
    Py_ssize_t waiting = PyObject_Size(args[3]);
    if (waiting < 0) {
        Py_DECREF(result);
        return NULL;
    }
    PyObject *reply = NULL;
    if (waiting == 0) {
        PyObject *items[3] = {state->kind_reply, result, state->no_releases};
        reply = plain_items(state, items, 3, NULL, 0, raw_limit);
        if (reply == NULL) {
            Py_DECREF(result);
            return NULL;
        }
    }
    if (reply == NULL || reply == Py_None) {
        Py_XDECREF(reply);
        reply = PyTuple_Pack(1, result);
    }
    Py_DECREF(result);
    return reply;
}

/* -- module -------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"packb", (PyCFunction)(void (*)(void))packb, METH_VARARGS | METH_KEYWORDS, "packb(o, *, default) -> bytes"},
    {"unpackb", (PyCFunction)(void (*)(void))unpackb, METH_FASTCALL | METH_KEYWORDS, "unpackb(packed, *, ext_hook)"},
    {"call_frame", (PyCFunction)(void (*)(void))call_frame, METH_FASTCALL,
     "call_frame(op, target, name, args, kwargs, releases, raw_limit) -> bytes | None"},
    {"reply_frame", (PyCFunction)(void (*)(void))reply_frame, METH_FASTCALL,
     "reply_frame(value, releases, raw_limit) -> bytes | None"},
    {"reply_value", reply_value, METH_O, "reply_value(frame) -> value | NOT_PLAIN"},
    {"call_parts", (PyCFunction)(void (*)(void))call_parts, METH_FASTCALL,
     "call_parts(frame, no_kwargs) -> (op, target, name, args, kwargs[, releases]) | None"},
    {"serve_call", (PyCFunction)(void (*)(void))serve_call, METH_FASTCALL,
     "serve_call(frame, objects, no_kwargs, dying, raw_limit) -> bytes | (result,) | fields | None"},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    ModuleState *state = PyModule_GetState(module);
    PyObject *ext = PyImport_ImportModule("msgpack.ext");
    if (ext == NULL) {
        return -1;
    }
    state->ext_type = PyObject_GetAttrString(ext, "ExtType");
    Py_DECREF(ext);
    if (state->ext_type == NULL) {
        return -1;
    }
    state->packer_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &packer_spec, NULL);
    state->kw_ext_hook = PyUnicode_InternFromString("ext_hook");
    state->kw_strict_map_key = PyUnicode_InternFromString("strict_map_key");
    state->kw_raw = PyUnicode_InternFromString("raw");
    state->kind_call = PyLong_FromLong(1);
    state->kind_reply = PyLong_FromLong(2);
    state->not_plain = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    state->no_releases = PyList_New(0);
    if (state->packer_type == NULL || !state->kw_ext_hook || !state->kw_strict_map_key || !state->kw_raw ||
        !state->kind_call || !state->kind_reply || !state->not_plain || !state->no_releases) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "NOT_PLAIN", state->not_plain) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Packer", (PyObject *)state->packer_type) < 0 ||
        PyModule_AddObjectRef(module, "ExtType", state->ext_type) < 0) {
        return -1;
    }
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *state = PyModule_GetState(module);
    Py_VISIT(state->ext_type);
    Py_VISIT(state->packer_type);
    Py_VISIT(state->kw_ext_hook);
    Py_VISIT(state->kw_strict_map_key);
    Py_VISIT(state->kw_raw);
    Py_VISIT(state->kind_call);
    Py_VISIT(state->kind_reply);
    Py_VISIT(state->not_plain);
    Py_VISIT(state->no_releases);
    return 0;
}

static int
module_clear(PyObject *module)
{
    ModuleState *state = PyModule_GetState(module);
    Py_CLEAR(state->ext_type);
    Py_CLEAR(state->packer_type);
    Py_CLEAR(state->kw_ext_hook);
    Py_CLEAR(state->kw_strict_map_key);
    Py_CLEAR(state->kw_raw);
    Py_CLEAR(state->kind_call);
    Py_CLEAR(state->kind_reply);
    Py_CLEAR(state->not_plain);
    Py_CLEAR(state->no_releases);
    PyMem_Free(state->frame.data);
    state->frame.data = NULL;
    state->frame.cap = 0;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flexos._msgpack",
    .m_doc = "msgpack encoding for gates in subinterpreters (per-interpreter state).",
    .m_size = sizeof(ModuleState),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
};

PyMODINIT_FUNC
PyInit__msgpack(void)
{
    return PyModuleDef_Init(&module_def);
}
