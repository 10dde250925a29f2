/*
 * speedups.c - msgsock._speedups: the frame codec's hot loops in C, over frame.h.
 *
 * Theory of operation.  msgsock.framing stays the reference and keeps all the state: it
 * builds one native Format per FrameFormat (at construction) and, when this module is
 * importable, its FrameDecoder/FrameFormat methods call the functions below for the
 * loops that cost per frame.  Each function either does the whole job the reference
 * would do, or returns None to say "take the reference path" (an input type or a value
 * this code does not handle); it never words an exception of the codec itself:
 *
 *   parse(fmt, data, tail) -> (frames, used, need, bad) | None
 *       The complete frames at the start of data (bytes, bytearray or a 1-D contiguous
 *       byte memoryview): a list of bytes, or of Message when the format has extra
 *       fields.  `need` is what completes the unfinished frame (None after a bad
 *       header); `bad` is None or the raw length field of the bad header that stopped
 *       the scan (framing.py builds the error from it).  With a bytearray `tail` and no
 *       bad header, the unparsed rest of data is appended to it.
 *   scan(fmt, data, tail) -> (count, span, used, need, bad) | None
 *       The same walk without splitting: the frames' bytes as one bytes object.
 *   encode_header(fmt, size, header) -> bytes | None
 *   encode_parts(fmt, body, header) -> (bytes, body) | None
 *       The header for a body: only for an exact int size and ints that fit; every
 *       other case (and every error) is left to the reference, so the exceptions and
 *       their messages are the reference's own.
 *
 * The buffer of `data` is held (exported) for the whole call, so nothing can resize it
 * under the loop, even code run by the garbage collector.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "frame.h"

/* -- Format ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    msf_format f;
    PyObject *names;        /* tuple of str, one per extra field (wire order) */
    PyObject *message_type; /* msgsock.framing.Message */
} FormatObject;

static void Format_dealloc(FormatObject *self) {
    Py_CLEAR(self->names);
    Py_CLEAR(self->message_type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Format(length_size, big_endian, includes_header, length_offset, header_size, max_body,
 *        fields, names, message_type); fields: tuple of (offset, size, signed). */
static PyObject *Format_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    unsigned int length_size;
    int big, incl;
    Py_ssize_t offset, hsize;
    unsigned long long max_body;
    PyObject *fields, *names, *message_type;
    static char *kwlist[] = {"length_size", "big_endian", "includes_header", "length_offset", "header_size",
                             "max_body", "fields", "names", "message_type", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "IppnnKO!O!O:Format", kwlist, &length_size, &big, &incl,
                                     &offset, &hsize, &max_body, &PyTuple_Type, &fields, &PyTuple_Type,
                                     &names, &message_type))
        return NULL;
    if (offset < 0 || hsize < 0 || PyTuple_GET_SIZE(fields) != PyTuple_GET_SIZE(names) ||
        !PyType_Check(message_type)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent native frame format");
        return NULL;
    }
    FormatObject *self = (FormatObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    if (msf_format_init(&self->f, length_size, big, incl, (size_t)offset, (size_t)hsize, max_body) != MSF_OK)
        goto bad;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        Py_ssize_t foff;
        unsigned int fsize;
        int fsigned;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, i), "nIp", &foff, &fsize, &fsigned)) {
            Py_DECREF(self);
            return NULL;
        }
        if (foff < 0 || msf_format_add_field(&self->f, (size_t)foff, fsize, fsigned) != MSF_OK) goto bad;
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i))) goto bad;
    }
    Py_INCREF(names);
    self->names = names;
    Py_INCREF(message_type);
    self->message_type = message_type;
    return (PyObject *)self;
bad:
    Py_DECREF(self);
    PyErr_SetString(PyExc_ValueError, "frame format out of the native codec's range");
    return NULL;
}

static PyObject *Format_get_header_size(FormatObject *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->f.header_size);
}

static PyGetSetDef Format_getset[] = {
    {"header_size", (getter)Format_get_header_size, NULL, "header bytes", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FormatType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "msgsock._speedups.Format",
    .tp_basicsize = sizeof(FormatObject),
    .tp_dealloc = (destructor)Format_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A frame format compiled for the native codec (built by msgsock.framing.FrameFormat).",
    .tp_new = Format_new,
    .tp_getset = Format_getset,
};

static PyObject *str_header; /* "header" */

/* -- inputs ----------------------------------------------------------------------- */

/* Export the bytes of data: 1, or 0 for a type or shape left to the reference (no error
 * set), or -1 with an error set. */
static int get_bytes(PyObject *data, Py_buffer *view) {
    if (PyBytes_CheckExact(data) || PyByteArray_CheckExact(data)) {
        return PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0 ? -1 : 1;
    }
    if (!PyMemoryView_Check(data)) return 0;
    const Py_buffer *shape = PyMemoryView_GET_BUFFER(data);
    if (shape->ndim != 1 || shape->itemsize != 1) return 0; /* the reference slices items, not bytes */
    if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0) {
        /* released, or not contiguous: the reference raises its own error or copes */
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static FormatObject *check_format(PyObject *obj) {
    if (!PyObject_TypeCheck(obj, &FormatType)) {
        PyErr_SetString(PyExc_TypeError, "expected a msgsock._speedups.Format");
        return NULL;
    }
    return (FormatObject *)obj;
}

/* need and bad as Python objects (new references) from a scan result. */
static int scan_outcome(const msf_format *f, const msf_scan_result *r, PyObject **need, PyObject **bad) {
    *need = *bad = NULL;
    if (r->error != MSF_OK) {
        Py_INCREF(Py_None);
        *need = Py_None;
        *bad = PyLong_FromUnsignedLongLong(r->length);
        return *bad == NULL ? -1 : 0;
    }
    uint64_t n;
    if (msf_need(f, r, &n) == 0) {
        *need = PyLong_FromUnsignedLongLong(n);
    } else {
        /* header + a body near 2**64: past uint64_t, as exact as the reference's int */
        PyObject *a = PyLong_FromUnsignedLongLong(r->size);
        PyObject *b = a ? PyLong_FromSize_t(f->header_size) : NULL;
        *need = b ? PyNumber_Add(a, b) : NULL;
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
    if (*need == NULL) return -1;
    Py_INCREF(Py_None);
    *bad = Py_None;
    return 0;
}

/* Append buf[0:n] to the bytearray tail. */
static int append_tail(PyObject *tail, const char *buf, Py_ssize_t n) {
    if (n <= 0) return 0;
    Py_ssize_t old = PyByteArray_GET_SIZE(tail);
    if (old > PY_SSIZE_T_MAX - n) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyByteArray_Resize(tail, old + n) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(tail) + old, buf, (size_t)n);
    return 0;
}

static int check_args(const char *name, Py_ssize_t nargs, PyObject *const *args, FormatObject **fmt,
                      PyObject **tail) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments (%zd given)", name, nargs);
        return -1;
    }
    *fmt = check_format(args[0]);
    if (*fmt == NULL) return -1;
    *tail = args[2];
    if (*tail != Py_None && !PyByteArray_CheckExact(*tail)) {
        PyErr_Format(PyExc_TypeError, "%s(): tail must be a bytearray or None", name);
        return -1;
    }
    return 0;
}

/* One frame's value: bytes, or Message(body, {name: value, ...}). */
static PyObject *make_frame(FormatObject *fmt, const uint8_t *p) {
    const msf_format *f = &fmt->f;
    uint64_t size = msf_body_size(f, p);
    PyObject *body = PyBytes_FromStringAndSize((const char *)p + f->header_size, (Py_ssize_t)size);
    if (body == NULL || f->nfields == 0) return body;
    PyObject *header = PyDict_New();
    PyObject *args = NULL, *msg = NULL;
    if (header == NULL) goto done;
    for (unsigned i = 0; i < f->nfields; i++) {
        uint64_t raw = msf_field_value(f, i, p);
        PyObject *v = f->fields[i].is_signed ? PyLong_FromLongLong((long long)(int64_t)raw)
                                             : PyLong_FromUnsignedLongLong(raw);
        if (v == NULL || PyDict_SetItem(header, PyTuple_GET_ITEM(fmt->names, i), v) < 0) {
            Py_XDECREF(v);
            goto done;
        }
        Py_DECREF(v);
    }
    /* What Message.__new__ does: a bytes of the subtype, then its header attribute. */
    args = PyTuple_Pack(1, body);
    if (args == NULL) goto done;
    msg = PyBytes_Type.tp_new((PyTypeObject *)fmt->message_type, args, NULL);
    if (msg != NULL && PyObject_SetAttr(msg, str_header, header) < 0) Py_CLEAR(msg);
done:
    Py_XDECREF(args);
    Py_XDECREF(header);
    Py_DECREF(body);
    return msg;
}

/* -- parse / scan ----------------------------------------------------------------- */

static PyObject *sp_parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    FormatObject *fmt;
    PyObject *tail;
    if (check_args("parse", nargs, args, &fmt, &tail) < 0) return NULL;
    Py_buffer view;
    int got = get_bytes(args[1], &view);
    if (got <= 0) {
        if (got == 0) Py_RETURN_NONE;
        return NULL;
    }
    const msf_format *f = &fmt->f;
    const uint8_t *buf = (const uint8_t *)view.buf;
    msf_scan_result r;
    msf_scan(f, buf, (size_t)view.len, &r);
    PyObject *frames = PyList_New((Py_ssize_t)r.count);
    PyObject *need = NULL, *bad = NULL, *result = NULL;
    if (frames == NULL) goto done;
    size_t pos = 0;
    for (size_t i = 0; i < r.count; i++) {
        PyObject *frame = make_frame(fmt, buf + pos);
        if (frame == NULL) goto done;
        PyList_SET_ITEM(frames, (Py_ssize_t)i, frame);
        pos += f->header_size + (size_t)msf_body_size(f, buf + pos);
    }
    if (scan_outcome(f, &r, &need, &bad) < 0) goto done;
    if (tail != Py_None && r.error == MSF_OK &&
        append_tail(tail, (const char *)buf + r.used, view.len - (Py_ssize_t)r.used) < 0)
        goto done;
    PyObject *used = PyLong_FromSize_t(r.used);
    if (used != NULL) result = PyTuple_Pack(4, frames, used, need, bad);
    Py_XDECREF(used);
done:
    Py_XDECREF(frames);
    Py_XDECREF(need);
    Py_XDECREF(bad);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *sp_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    FormatObject *fmt;
    PyObject *tail;
    if (check_args("scan", nargs, args, &fmt, &tail) < 0) return NULL;
    Py_buffer view;
    int got = get_bytes(args[1], &view);
    if (got <= 0) {
        if (got == 0) Py_RETURN_NONE;
        return NULL;
    }
    const msf_format *f = &fmt->f;
    const char *buf = (const char *)view.buf;
    msf_scan_result r;
    msf_scan(f, (const uint8_t *)buf, (size_t)view.len, &r);
    PyObject *span = NULL, *need = NULL, *bad = NULL, *result = NULL;
    span = PyBytes_FromStringAndSize(buf, (Py_ssize_t)r.used);
    if (span == NULL) goto done;
    if (scan_outcome(f, &r, &need, &bad) < 0) goto done;
    if (tail != Py_None && r.error == MSF_OK && append_tail(tail, buf + r.used, view.len - (Py_ssize_t)r.used) < 0)
        goto done;
    PyObject *count = PyLong_FromSize_t(r.count), *used = PyLong_FromSize_t(r.used);
    if (count != NULL && used != NULL) result = PyTuple_Pack(5, count, span, used, need, bad);
    Py_XDECREF(count);
    Py_XDECREF(used);
done:
    Py_XDECREF(span);
    Py_XDECREF(need);
    Py_XDECREF(bad);
    PyBuffer_Release(&view);
    return result;
}

/* -- encode ----------------------------------------------------------------------- */

/* A field value from an exact int: 1 (in *out, a signed one as int64_t bits), 0 when it
 * is not an exact int or out of the field's 64-bit range (msf_value_fits checks the
 * width), -1 with an error set. */
static int encode_value(const msf_field *fd, PyObject *v, uint64_t *out) {
    int overflow;
    if (!PyLong_CheckExact(v)) return 0;
    long long s = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (s == -1 && PyErr_Occurred()) return -1;
    if (fd->is_signed) {
        if (overflow) return 0;
        *out = (uint64_t)(int64_t)s;
        return 1;
    }
    if (overflow < 0 || (!overflow && s < 0)) return 0;
    if (!overflow) {
        *out = (uint64_t)s;
        return 1;
    }
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* above 2**64 - 1 */
        return 0;
    }
    *out = (uint64_t)u;
    return 1;
}

/* The header for a body of `size` (an exact int) with `header` (None or an exact dict of
 * exact ints, every key a field): a new bytes, Py_None (new ref) to defer to the
 * reference, or NULL with an error. */
static PyObject *encode(FormatObject *fmt, PyObject *size_obj, PyObject *header) {
    const msf_format *f = &fmt->f;
    if (!PyLong_CheckExact(size_obj)) Py_RETURN_NONE;
    int overflow;
    long long size = PyLong_AsLongLongAndOverflow(size_obj, &overflow);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (overflow || size < 0) Py_RETURN_NONE;
    uint64_t values[MSF_MAX_FIELDS];
    const uint64_t *vals = NULL;
    if (header != Py_None) {
        if (!PyDict_CheckExact(header)) Py_RETURN_NONE;
        Py_ssize_t given = PyDict_GET_SIZE(header);
        if (given) {
            if ((unsigned)given > f->nfields) Py_RETURN_NONE; /* unknown names: the reference says which */
            Py_ssize_t found = 0;
            for (unsigned i = 0; i < f->nfields; i++) {
                PyObject *v = PyDict_GetItemWithError(header, PyTuple_GET_ITEM(fmt->names, i));
                if (v == NULL) {
                    if (PyErr_Occurred()) return NULL;
                    values[i] = 0;
                    continue;
                }
                found++;
                Py_INCREF(v);
                int fits = encode_value(&f->fields[i], v, &values[i]);
                Py_DECREF(v);
                if (fits < 0) return NULL;
                if (fits == 0) Py_RETURN_NONE;
            }
            if (found != given) Py_RETURN_NONE;
            vals = values;
        }
    }
    uint8_t out[MSF_MAX_HEADER];
    if (msf_encode_header(f, (uint64_t)size, vals, out) != MSF_OK) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)f->header_size);
}

static PyObject *sp_encode_header(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "encode_header() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    FormatObject *fmt = check_format(args[0]);
    if (fmt == NULL) return NULL;
    return encode(fmt, args[1], args[2]);
}

static PyObject *sp_encode_parts(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "encode_parts() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    FormatObject *fmt = check_format(args[0]);
    if (fmt == NULL) return NULL;
    PyObject *body = args[1], *header = args[2];
    Py_ssize_t n;
    if (PyBytes_CheckExact(body)) {
        n = PyBytes_GET_SIZE(body);
    } else if (Py_IS_TYPE(body, (PyTypeObject *)fmt->message_type)) {
        n = PyBytes_GET_SIZE(body);
        if (header == Py_None) {
            header = PyObject_GetAttr(body, str_header);
            if (header == NULL) {
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            Py_DECREF(header); /* held by the message for this call */
        }
    } else if (PyByteArray_CheckExact(body)) {
        n = PyByteArray_GET_SIZE(body);
    } else {
        Py_RETURN_NONE; /* memoryview and the rest: the reference */
    }
    PyObject *size = PyLong_FromSsize_t(n);
    if (size == NULL) return NULL;
    PyObject *head = encode(fmt, size, header);
    Py_DECREF(size);
    if (head == NULL || head == Py_None) return head;
    PyObject *result = PyTuple_Pack(2, head, body);
    Py_DECREF(head);
    return result;
}

/* -- module ----------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"parse", (PyCFunction)(void (*)(void))sp_parse, METH_FASTCALL,
     "parse(fmt, data, tail) -> (frames, used, need, bad) | None"},
    {"scan", (PyCFunction)(void (*)(void))sp_scan, METH_FASTCALL,
     "scan(fmt, data, tail) -> (count, span, used, need, bad) | None"},
    {"encode_header", (PyCFunction)(void (*)(void))sp_encode_header, METH_FASTCALL,
     "encode_header(fmt, size, header) -> bytes | None"},
    {"encode_parts", (PyCFunction)(void (*)(void))sp_encode_parts, METH_FASTCALL,
     "encode_parts(fmt, body, header) -> (bytes, body) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "msgsock._speedups",
    "The frame codec's hot loops in C (see msgsock.framing and msgsock.extensions).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&FormatType) < 0) return NULL;
    str_header = PyUnicode_InternFromString("header");
    if (str_header == NULL) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    Py_INCREF(&FormatType);
    if (PyModule_AddObject(m, "Format", (PyObject *)&FormatType) < 0) {
        Py_DECREF(&FormatType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_HEADER", MSF_MAX_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "MAX_FIELDS", MSF_MAX_FIELDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
