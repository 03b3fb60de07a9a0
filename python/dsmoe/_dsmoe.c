/*
 * _dsmoe.c — the CPython extension under the dsmoe package: thin calls into libdsmoe
 * on buffers (the buffer protocol: no NumPy headers), the GIL released around every
 * library call. The pure-Python layer (dsmoe/__init__.py, dsmoe/torch.py) converts
 * arrays, allocates the outputs and names the arguments; this file checks what it
 * is handed (format, item size, contiguity, length) so that a wrong buffer is a
 * ValueError, never a read or write out of bounds.
 *
 * Errors: a dsmoe status becomes ValueError (bad argument, config, shape, non-finite
 * value, unknown name, malformed file, unsupported operation) or RuntimeError (out of
 * memory, I/O, workspace, internal) carrying dsmoe_last_error() verbatim.
 *
 * Workspaces: the router's scratch is kept per OS thread (a pthread key whose
 * destructor frees it when the thread ends) and only ever grows, so a call allocates
 * nothing once a thread has routed its largest batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dsmoe.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------ errors -- */

static PyObject *raise_status(dsmoe_status st) {
    const char *msg = dsmoe_last_error();
    if (!msg || !msg[0]) msg = dsmoe_strerror(st);
    PyObject *type = PyExc_ValueError;
    switch (st) {
    case DSMOE_STATUS_OUT_OF_MEMORY:
    case DSMOE_STATUS_WORKSPACE_TOO_SMALL:
    case DSMOE_STATUS_IO:
    case DSMOE_STATUS_INTERNAL:
        type = PyExc_RuntimeError;
        break;
    default:
        break;
    }
    PyErr_SetString(type, msg);
    return NULL;
}

/* ------------------------------------------------------------------ buffers -- */

/* Element kinds the binding accepts, with their struct format characters. */
enum { K_F32, K_I32, K_I64, K_U8, K_U16 };

static int format_is(const Py_buffer *b, int kind) {
    const char *f = b->format ? b->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (f[0] == '\0' || f[1] != '\0') return 0;
    switch (kind) {
    case K_F32: return f[0] == 'f' && b->itemsize == 4;
    case K_I32: return (f[0] == 'i' || f[0] == 'l') && b->itemsize == 4;
    case K_I64: return (f[0] == 'l' || f[0] == 'q') && b->itemsize == 8;
    case K_U8: return (f[0] == 'B' || f[0] == '?') && b->itemsize == 1;
    case K_U16: return (f[0] == 'H') && b->itemsize == 2;
    }
    return 0;
}

static const char *const kind_name[] = {"float32", "int32", "int64", "uint8", "uint16"};

/* Gets a C-contiguous buffer of `kind` with exactly n elements (n < 0: any count),
 * writable if asked. obj None is allowed when optional (b->obj stays NULL). */
static int get_buf(PyObject *obj, Py_buffer *b, int kind, Py_ssize_t n, int writable,
                   int optional, const char *what) {
    memset(b, 0, sizeof *b);
    if (obj == Py_None && optional) return 0;
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: expected a %sC-contiguous %s array", what,
                     writable ? "writable " : "", kind_name[kind]);
        memset(b, 0, sizeof *b);
        return -1;
    }
    if (!format_is(b, kind)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %s elements, got format '%s'", what,
                     kind_name[kind], b->format ? b->format : "B");
        PyBuffer_Release(b);
        return -1;
    }
    Py_ssize_t count = b->len / b->itemsize;
    if (n >= 0 && count != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd elements, got %zd", what, n, count);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static void rel(Py_buffer *b) {
    if (b->obj) PyBuffer_Release(b);
}

/* ------------------------------------------------------- per-thread scratch -- */

typedef struct scratch {
    void *p;
    size_t size;
} scratch;

static pthread_key_t scratch_key;

static void scratch_destroy(void *v) {
    scratch *s = v;
    if (s) {
        dsmoe_free(s->p);
        free(s);
    }
}

/* The calling thread's scratch of at least n bytes (NULL with MemoryError set). Called
 * with the GIL held. */
static void *scratch_get(size_t n) {
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            PyErr_NoMemory();
            return NULL;
        }
    }
    if (s->size < n) {
        size_t want = n < 4096 ? 4096 : n + n / 4;
        void *p = dsmoe_malloc(want);
        if (!p) {
            PyErr_NoMemory();
            return NULL;
        }
        dsmoe_free(s->p);
        s->p = p;
        s->size = want;
    }
    return s->p;
}

/* ---------------------------------------------------------- router config -- */

typedef struct {
    PyObject_HEAD
    dsmoe_router_config cfg;
} RouterConfigObject;

static PyTypeObject RouterConfigType;

static int parse_enum(PyObject *v, const char *field, const char *const *names, int n,
                      int32_t *out) {
    if (!PyUnicode_Check(v)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a string, got %R", field, v);
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(v);
    if (!s) return -1;
    for (int i = 0; i < n; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    PyErr_Format(PyExc_ValueError, "%s: unknown value '%s'", field, s);
    return -1;
}

static int parse_int(PyObject *v, const char *field, long lo, long hi, int32_t *out) {
    if (PyBool_Check(v) || !PyLong_Check(v)) {
        PyErr_Format(PyExc_ValueError, "%s: expected an integer, got %R", field, v);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < lo || x > hi) {
        PyErr_Format(PyExc_ValueError, "%s = %ld is out of range %ld..%ld", field, x, lo, hi);
        return -1;
    }
    *out = (int32_t)x;
    return 0;
}

static int parse_float(PyObject *v, const char *field, float *out) {
    if (PyBool_Check(v) || !(PyFloat_Check(v) || PyLong_Check(v))) {
        PyErr_Format(PyExc_ValueError, "%s: expected a number, got %R", field, v);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

static int parse_bool(PyObject *v, const char *field, int32_t *out) {
    if (!PyBool_Check(v) && !PyLong_Check(v)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a bool, got %R", field, v);
        return -1;
    }
    int x = PyObject_IsTrue(v);
    if (x < 0) return -1;
    *out = x;
    return 0;
}

/* group_score: "max", "topsum" (keeps group_topm), "top2sum", "topNsum". */
static int parse_group_score(PyObject *v, dsmoe_router_config *c) {
    if (!PyUnicode_Check(v)) {
        PyErr_Format(PyExc_ValueError, "group_score: expected a string, got %R", v);
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(v);
    if (!s) return -1;
    size_t len = strlen(s);
    if (strcmp(s, "max") == 0) {
        c->group_score = DSMOE_GROUP_SCORE_MAX;
        c->group_topm = 1;
        return 0;
    }
    if (strcmp(s, "topsum") == 0) {
        c->group_score = DSMOE_GROUP_SCORE_TOPSUM;
        return 0;
    }
    if (len > 6 && len < 12 && strncmp(s, "top", 3) == 0 && strcmp(s + len - 3, "sum") == 0) {
        long m = 0;
        for (size_t i = 3; i < len - 3; i++) {
            if (s[i] < '0' || s[i] > '9') goto bad;
            m = m * 10 + (s[i] - '0');
        }
        if (m < 1 || m > DSMOE_MAX_EXPERTS) goto bad;
        c->group_score = DSMOE_GROUP_SCORE_TOPSUM;
        c->group_topm = (int32_t)m;
        return 0;
    }
bad:
    PyErr_Format(PyExc_ValueError, "group_score: expected max, top2sum or topNsum, got '%s'", s);
    return -1;
}

/* router_config(preset, overrides: dict) -> RouterConfig, validated. */
static PyObject *py_router_config(PyObject *self, PyObject *args) {
    (void)self;
    const char *preset;
    PyObject *over;
    if (!PyArg_ParseTuple(args, "sO!", &preset, &PyDict_Type, &over)) return NULL;
    RouterConfigObject *o = PyObject_New(RouterConfigObject, &RouterConfigType);
    if (!o) return NULL;
    dsmoe_router_config *c = &o->cfg;
    dsmoe_status st = dsmoe_router_preset(preset, c);
    if (st != DSMOE_OK) {
        Py_DECREF(o);
        return raise_status(st);
    }
    static const char *const score_names[] = {"sigmoid", "softmax"};
    static const char *const mask_names[] = {"exclude", "zero"};
    static const char *const prec_names[] = {"fp32", "bf16"};
    static const char *const nonf_names[] = {"error", "sanitize"};
    PyObject *key, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(over, &pos, &key, &v)) {
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        int r;
        int32_t e = 0;
        if (!k) {
            PyErr_SetString(PyExc_ValueError, "router override names must be strings");
            r = -1;
        } else if (strcmp(k, "experts") == 0) {
            r = parse_int(v, k, 1, DSMOE_MAX_EXPERTS, &c->n_experts);
        } else if (strcmp(k, "groups") == 0) {
            r = parse_int(v, k, 1, DSMOE_MAX_EXPERTS, &c->n_groups);
        } else if (strcmp(k, "topk_groups") == 0) {
            r = parse_int(v, k, 1, DSMOE_MAX_EXPERTS, &c->topk_groups);
        } else if (strcmp(k, "top_k") == 0) {
            r = parse_int(v, k, 1, DSMOE_MAX_EXPERTS, &c->top_k);
        } else if (strcmp(k, "group_topm") == 0) {
            r = parse_int(v, k, 1, DSMOE_MAX_EXPERTS, &c->group_topm);
        } else if (strcmp(k, "score") == 0) {
            r = parse_enum(v, k, score_names, 2, &e);
            c->score_func = (dsmoe_score_func)e;
        } else if (strcmp(k, "group_score") == 0) {
            r = parse_group_score(v, c);
        } else if (strcmp(k, "mask") == 0) {
            r = parse_enum(v, k, mask_names, 2, &e);
            c->group_mask = (dsmoe_group_mask)e;
        } else if (strcmp(k, "normalize") == 0) {
            r = parse_bool(v, k, &c->normalize);
        } else if (strcmp(k, "norm_eps") == 0) {
            r = parse_float(v, k, &c->norm_eps);
        } else if (strcmp(k, "scale") == 0) {
            r = parse_float(v, k, &c->scale);
        } else if (strcmp(k, "precision") == 0) {
            r = parse_enum(v, k, prec_names, 2, &e);
            c->precision = (dsmoe_precision)e;
        } else if (strcmp(k, "use_bias") == 0) {
            r = parse_bool(v, k, &c->use_bias);
        } else if (strcmp(k, "nonfinite") == 0) {
            r = parse_enum(v, k, nonf_names, 2, &e);
            c->nonfinite = (dsmoe_nonfinite)e;
        } else {
            PyErr_Format(PyExc_TypeError,
                         "unknown router override '%s' (known: experts, groups, topk_groups, "
                         "top_k, score, group_score, group_topm, mask, normalize, norm_eps, "
                         "scale, precision, use_bias, nonfinite)",
                         k);
            r = -1;
        }
        if (r != 0) {
            Py_DECREF(o);
            return NULL;
        }
    }
    st = dsmoe_router_config_validate(c);
    if (st != DSMOE_OK) {
        Py_DECREF(o);
        return raise_status(st);
    }
    return (PyObject *)o;
}

static PyObject *rc_json(PyObject *self, PyObject *unused) {
    (void)unused;
    char buf[1024];
    dsmoe_router_config_json(&((RouterConfigObject *)self)->cfg, buf, sizeof buf);
    return PyUnicode_FromString(buf);
}

static PyObject *rc_get(PyObject *self, void *which) {
    const dsmoe_router_config *c = &((RouterConfigObject *)self)->cfg;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(c->n_experts);
    case 1: return PyLong_FromLong(c->top_k);
    case 2: return PyLong_FromLong(c->use_bias);
    case 3: return PyLong_FromLong(c->n_groups);
    case 4: return PyLong_FromLong(c->score_func);
    }
    Py_RETURN_NONE;
}

static PyMethodDef rc_methods[] = {
    {"json", rc_json, METH_NOARGS, "One-line JSON of the config (dsmoe_router_config_json)."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef rc_getset[] = {
    {"n_experts", rc_get, NULL, "E", (void *)0},
    {"top_k", rc_get, NULL, "K", (void *)1},
    {"use_bias", rc_get, NULL, "1 when a bias is required", (void *)2},
    {"n_groups", rc_get, NULL, "G", (void *)3},
    {"score_func", rc_get, NULL, "0 sigmoid, 1 softmax", (void *)4},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject RouterConfigType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dsmoe._dsmoe.RouterConfig",
    .tp_basicsize = sizeof(RouterConfigObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A validated dsmoe_router_config (made by router_config()).",
    .tp_methods = rc_methods,
    .tp_getset = rc_getset,
};

static const dsmoe_router_config *as_rc(PyObject *o) {
    if (!PyObject_TypeCheck(o, &RouterConfigType)) {
        PyErr_SetString(PyExc_TypeError, "expected a RouterConfig");
        return NULL;
    }
    return &((RouterConfigObject *)o)->cfg;
}

/* ------------------------------------------------------------------ router -- */

/* Output arrays: made by numpy.empty, handed over by the Python layer at import
 * (set_allocator), so that this file needs no NumPy headers. */
static PyObject *np_empty, *np_f32, *np_i32, *np_i64;

static PyObject *py_set_allocator(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *e, *f, *i, *l;
    if (!PyArg_ParseTuple(args, "OOOO", &e, &f, &i, &l)) return NULL;
    Py_XSETREF(np_empty, Py_NewRef(e));
    Py_XSETREF(np_f32, Py_NewRef(f));
    Py_XSETREF(np_i32, Py_NewRef(i));
    Py_XSETREF(np_i64, Py_NewRef(l));
    Py_RETURN_NONE;
}

/* numpy.empty(shape, dtype): (rows, cols), or (cols) when rows < 0. */
static PyObject *new_array(Py_ssize_t rows, Py_ssize_t cols, PyObject *dtype) {
    if (!np_empty) {
        PyErr_SetString(PyExc_RuntimeError, "dsmoe._dsmoe: set_allocator was not called");
        return NULL;
    }
    PyObject *shape = PyTuple_New(rows < 0 ? 1 : 2);
    if (!shape) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); i++) {
        PyObject *d = PyLong_FromSsize_t(rows < 0 || i == 1 ? cols : rows);
        if (!d) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, i, d);
    }
    PyObject *argv[2] = {shape, dtype};
    PyObject *a = PyObject_Vectorcall(np_empty, argv, 2, NULL);
    Py_DECREF(shape);
    return a;
}

/* The memory of an array new_array just made (its dtype known): a plain writable
 * buffer of `bytes` bytes, without the format string. */
static int get_new(PyObject *a, Py_buffer *b, Py_ssize_t bytes) {
    if (PyObject_GetBuffer(a, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
        memset(b, 0, sizeof *b);
        return -1;
    }
    if (b->len != bytes) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_RuntimeError, "dsmoe._dsmoe: numpy.empty gave an array of another size");
        return -1;
    }
    return 0;
}

/* route_new(cfg, logits, bias|None, threads, want_scores, want_counts) -> (indices,
 * weights[, scores][, counts]) in new arrays, or None when logits or bias is not
 * already a C-contiguous float32 buffer of the right length (the Python layer then
 * converts and checks it, and calls again): the one-call path of dsmoe.route. */
static PyObject *route_core(const dsmoe_router_config *c, PyObject *logits, PyObject *bias_o,
                            int threads, int want_s, int want_c) {
    Py_ssize_t E = c->n_experts, K = c->top_k;
    Py_buffer bl, bb, bi, bw, bs, bc;
    memset(&bb, 0, sizeof bb), memset(&bi, 0, sizeof bi), memset(&bw, 0, sizeof bw);
    memset(&bs, 0, sizeof bs), memset(&bc, 0, sizeof bc);
    PyObject *ret = NULL, *oi = NULL, *ow = NULL, *os_ = NULL, *oc = NULL;
    /* fast acceptance: an exporter of C-contiguous float32 with (T, E) elements */
    if (PyObject_GetBuffer(logits, &bl, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (!format_is(&bl, K_F32) || bl.ndim != 2 || bl.shape[1] != E) {
        PyBuffer_Release(&bl);
        Py_RETURN_NONE;
    }
    Py_ssize_t T = bl.shape[0];
    if (bias_o != Py_None) {
        if (!c->use_bias ||
            PyObject_GetBuffer(bias_o, &bb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
            PyErr_Clear();
            memset(&bb, 0, sizeof bb);
            PyBuffer_Release(&bl);
            Py_RETURN_NONE;
        }
        if (!format_is(&bb, K_F32) || bb.ndim != 1 || bb.shape[0] != E) {
            PyBuffer_Release(&bb);
            PyBuffer_Release(&bl);
            Py_RETURN_NONE;
        }
    }
    const float *bias = bb.buf;
    if (!bias && c->use_bias) {
        /* no bias given: route with zeros (read-only, shared, made once) */
        static float *zeros;
        if (!zeros && !(zeros = calloc(DSMOE_MAX_EXPERTS, sizeof(float)))) {
            PyErr_NoMemory();
            goto done;
        }
        bias = zeros;
    }
    oi = new_array(T, K, np_i32);
    ow = oi ? new_array(T, K, np_f32) : NULL;
    if (!ow) goto done;
    if (want_s && !(os_ = new_array(T, E, np_f32))) goto done;
    if (want_c && !(oc = new_array(-1, E, np_i64))) goto done;
    if (get_new(oi, &bi, T * K * 4) || get_new(ow, &bw, T * K * 4) ||
        (os_ && get_new(os_, &bs, T * E * 4)) || (oc && get_new(oc, &bc, E * 8)))
        goto done;
    size_t wsn = dsmoe_router_workspace_size(c, T, 0, DSMOE_DTYPE_F32, threads);
    void *ws = scratch_get(wsn);
    if (!ws) goto done;
    dsmoe_router_output out = {bi.buf, bw.buf, bs.buf, NULL, bc.buf};
    dsmoe_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_router_forward(c, &out, bl.buf, bias, T, ws, wsn, threads);
    Py_END_ALLOW_THREADS
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    rel(&bi), rel(&bw), rel(&bs), rel(&bc);
    if (!os_ && !oc) {
        ret = PyTuple_Pack(2, oi, ow);
    } else if (os_ && oc) {
        ret = PyTuple_Pack(4, oi, ow, os_, oc);
    } else {
        ret = PyTuple_Pack(3, oi, ow, os_ ? os_ : oc);
    }
done:
    rel(&bl), rel(&bb), rel(&bi), rel(&bw), rel(&bs), rel(&bc);
    Py_XDECREF(oi), Py_XDECREF(ow), Py_XDECREF(os_), Py_XDECREF(oc);
    return ret;
}

static PyObject *py_route_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "route_new: 6 arguments expected");
        return NULL;
    }
    const dsmoe_router_config *c = as_rc(args[0]);
    if (!c) return NULL;
    int threads = (int)PyLong_AsLong(args[3]);
    if (threads == -1 && PyErr_Occurred()) return NULL;
    int want_s = PyObject_IsTrue(args[4]), want_c = PyObject_IsTrue(args[5]);
    if (want_s < 0 || want_c < 0) return NULL;
    return route_core(c, args[1], args[2], threads, want_s, want_c);
}

/* dsmoe.route itself: the common call (ready float32 arrays, the default preset or a
 * RouterConfig, keywords threads / scores / counts) runs here without a Python frame;
 * anything else (overrides, other presets, arrays to convert or check) goes to the
 * Python layer's implementation, which converts, names the argument and calls
 * route_new. */
static PyObject *route_fallback, *default_rc;

static PyObject *py_set_route_fallback(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *f, *rc;
    if (!PyArg_ParseTuple(args, "OO!", &f, &RouterConfigType, &rc)) return NULL;
    Py_XSETREF(route_fallback, Py_NewRef(f));
    Py_XSETREF(default_rc, Py_NewRef(rc));
    Py_RETURN_NONE;
}

static int kw_is(PyObject *k, const char *name) {
    return PyUnicode_CompareWithASCIIString(k, name) == 0;
}

static PyObject *py_route_fast(PyObject *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames) {
    (void)self;
    if (!route_fallback || !default_rc) {
        PyErr_SetString(PyExc_RuntimeError, "dsmoe._dsmoe: set_route_fallback was not called");
        return NULL;
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *bias = Py_None, *preset = NULL;
    int threads = 1, want_s = 0, want_c = 0;
    if (nargs < 1 || nargs > 3) goto slow;
    if (nargs > 1) bias = args[1];
    if (nargs > 2) preset = args[2];
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
        if (kw_is(k, "bias") && nargs < 2) {
            bias = v;
        } else if (kw_is(k, "preset") && nargs < 3) {
            preset = v;
        } else if (kw_is(k, "threads") && PyLong_CheckExact(v)) {
            int overflow = 0;
            long t = PyLong_AsLongAndOverflow(v, &overflow);
            if (overflow || t < INT32_MIN || t > INT32_MAX) goto slow;
            threads = (int)t;
        } else if (kw_is(k, "scores") || kw_is(k, "counts")) {
            int b = PyObject_IsTrue(v);
            if (b < 0) return NULL;
            if (kw_is(k, "scores"))
                want_s = b;
            else
                want_c = b;
        } else {
            goto slow;
        }
    }
    const dsmoe_router_config *c;
    if (!preset || (PyUnicode_Check(preset) && PyUnicode_CompareWithASCIIString(
                                                   preset, "deepseek-v3") == 0))
        c = &((RouterConfigObject *)default_rc)->cfg;
    else if (PyObject_TypeCheck(preset, &RouterConfigType))
        c = &((RouterConfigObject *)preset)->cfg;
    else
        goto slow;
    {
        PyObject *r = route_core(c, args[0], bias, threads, want_s, want_c);
        if (r != Py_None) return r; /* the result, or NULL with the error set */
        Py_DECREF(r);
    }
slow:
    return PyObject_Vectorcall(route_fallback, args, nargsf, kwnames);
}

/* route_hidden(cfg, hidden, gate, gate_bf16, D, bias, indices, weights, scores, logits,
 *              counts, T, threads) */
static PyObject *py_route_hidden(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cfgo, *ho, *go, *bo, *io, *wo, *so, *lo, *co;
    int bf16, D, threads;
    Py_ssize_t T;
    if (!PyArg_ParseTuple(args, "OOOpiOOOOOOni", &cfgo, &ho, &go, &bf16, &D, &bo, &io, &wo,
                          &so, &lo, &co, &T, &threads))
        return NULL;
    const dsmoe_router_config *c = as_rc(cfgo);
    if (!c) return NULL;
    Py_ssize_t E = c->n_experts, K = c->top_k;
    Py_buffer bh, bg, bb, bi, bw, bs, bl, bc;
    PyObject *ret = NULL;
    memset(&bg, 0, sizeof bg), memset(&bb, 0, sizeof bb), memset(&bi, 0, sizeof bi);
    memset(&bw, 0, sizeof bw), memset(&bs, 0, sizeof bs), memset(&bl, 0, sizeof bl);
    memset(&bc, 0, sizeof bc);
    if (get_buf(ho, &bh, K_F32, T * D, 0, 0, "hidden")) return NULL;
    if (get_buf(go, &bg, bf16 ? K_U16 : K_F32, E * D, 0, 0, "gate_weight") ||
        get_buf(bo, &bb, K_F32, E, 0, 1, "bias") ||
        get_buf(io, &bi, K_I32, T * K, 1, 0, "indices") ||
        get_buf(wo, &bw, K_F32, T * K, 1, 0, "weights") ||
        get_buf(so, &bs, K_F32, T * E, 1, 1, "scores") ||
        get_buf(lo, &bl, K_F32, T * E, 1, 1, "logits") ||
        get_buf(co, &bc, K_I64, E, 1, 1, "counts"))
        goto done;
    dsmoe_dtype gd = bf16 ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
    size_t wsn = dsmoe_router_workspace_size(c, T, D, gd, threads);
    void *ws = scratch_get(wsn);
    if (!ws) goto done;
    dsmoe_router_output out = {bi.buf, bw.buf, bs.buf, bl.buf, bc.buf};
    dsmoe_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_router_forward_hidden(c, &out, bh.buf, bg.buf, gd, D, bb.buf, T, ws, wsn,
                                     threads);
    Py_END_ALLOW_THREADS
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    rel(&bh), rel(&bg), rel(&bb), rel(&bi), rel(&bw), rel(&bs), rel(&bl), rel(&bc);
    return ret;
}

/* router_backward(cfg, dlogits (+=), dweights, indices, scores, T, threads) */
static PyObject *py_router_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cfgo, *dlo, *dwo, *io, *so;
    Py_ssize_t T;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOni", &cfgo, &dlo, &dwo, &io, &so, &T, &threads))
        return NULL;
    const dsmoe_router_config *c = as_rc(cfgo);
    if (!c) return NULL;
    Py_ssize_t E = c->n_experts, K = c->top_k;
    Py_buffer bd, bw, bi, bs;
    PyObject *ret = NULL;
    memset(&bw, 0, sizeof bw), memset(&bi, 0, sizeof bi), memset(&bs, 0, sizeof bs);
    if (get_buf(dlo, &bd, K_F32, T * E, 1, 0, "dlogits")) return NULL;
    if (get_buf(dwo, &bw, K_F32, T * K, 0, 0, "dweights") ||
        get_buf(io, &bi, K_I32, T * K, 0, 0, "indices") ||
        get_buf(so, &bs, K_F32, T * E, 0, 0, "scores"))
        goto done;
    dsmoe_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_router_backward(c, bd.buf, bw.buf, bi.buf, bs.buf, T, threads);
    Py_END_ALLOW_THREADS
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    rel(&bd), rel(&bw), rel(&bi), rel(&bs);
    return ret;
}

/* bench_route_c(cfg, logits, bias, T, n) -> seconds per call of dsmoe_router_forward
 * alone (outputs in the thread's scratch), the floor the binding's overhead is
 * measured against. */
static PyObject *py_bench_route_c(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cfgo, *lo, *bo;
    Py_ssize_t T, n;
    if (!PyArg_ParseTuple(args, "OOOnn", &cfgo, &lo, &bo, &T, &n)) return NULL;
    const dsmoe_router_config *c = as_rc(cfgo);
    if (!c) return NULL;
    Py_buffer bl, bb;
    if (get_buf(lo, &bl, K_F32, T * c->n_experts, 0, 0, "logits")) return NULL;
    if (get_buf(bo, &bb, K_F32, c->n_experts, 0, 1, "bias")) {
        rel(&bl);
        return NULL;
    }
    size_t wsn = dsmoe_router_workspace_size(c, T, 0, DSMOE_DTYPE_F32, 1);
    size_t outn = (size_t)T * (size_t)c->top_k * 8;
    char *ws = scratch_get(wsn + outn + 64);
    PyObject *ret = NULL;
    if (ws) {
        dsmoe_router_output out = {(int32_t *)(void *)(ws + wsn + 64 - wsn % 64),
                                   (float *)(void *)(ws + wsn + 64 - wsn % 64 + outn / 2),
                                   NULL, NULL, NULL};
        dsmoe_status st = DSMOE_OK;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (Py_ssize_t i = 0; i < n && st == DSMOE_OK; i++)
            st = dsmoe_router_forward(c, &out, bl.buf, bb.buf, T, ws, wsn, 1);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (st != DSMOE_OK)
            raise_status(st);
        else
            ret = PyFloat_FromDouble(((double)(t1.tv_sec - t0.tv_sec) +
                                      1e-9 * (double)(t1.tv_nsec - t0.tv_nsec)) /
                                     (double)(n > 0 ? n : 1));
    }
    rel(&bl), rel(&bb);
    return ret;
}

/* ---------------------------------------------------------------- balancer -- */

typedef struct {
    PyObject_HEAD
    dsmoe_balancer *b;
} BalancerObject;

static PyTypeObject BalancerType;

static void bal_dealloc(PyObject *self) {
    dsmoe_balancer_free(((BalancerObject *)self)->b);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *bal_wrap(dsmoe_balancer *b) {
    BalancerObject *o = PyObject_New(BalancerObject, &BalancerType);
    if (!o) {
        dsmoe_balancer_free(b);
        return NULL;
    }
    o->b = b;
    return (PyObject *)o;
}

/* balancer_create(E, rule, gamma, gamma_until_tokens, gamma_after, recenter) */
static PyObject *py_balancer_create(PyObject *self, PyObject *args) {
    (void)self;
    dsmoe_balancer_config bc;
    int E, rule, recenter;
    float gamma, after;
    long long until;
    if (!PyArg_ParseTuple(args, "iifLfp", &E, &rule, &gamma, &until, &after, &recenter))
        return NULL;
    dsmoe_balancer_config_default(E, &bc);
    bc.rule = (dsmoe_balance_rule)rule;
    bc.gamma = gamma;
    bc.gamma_until_tokens = until;
    bc.gamma_after = after;
    bc.recenter = recenter;
    dsmoe_balancer *b = NULL;
    dsmoe_status st = dsmoe_balancer_create(&bc, &b);
    if (st != DSMOE_OK) return raise_status(st);
    return bal_wrap(b);
}

static PyObject *py_balancer_load(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path)) return NULL;
    dsmoe_balancer *b = NULL;
    dsmoe_status st;
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_balancer_load(p, &b);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (st != DSMOE_OK) return raise_status(st);
    return bal_wrap(b);
}

/* bal_bias(b, out (E) float32): copies the bias out. */
static PyObject *bal_bias(PyObject *self, PyObject *arg) {
    dsmoe_balancer *b = ((BalancerObject *)self)->b;
    int32_t E = dsmoe_balancer_get_config(b)->n_experts;
    Py_buffer o;
    if (get_buf(arg, &o, K_F32, E, 1, 0, "bias")) return NULL;
    memcpy(o.buf, dsmoe_balancer_bias(b), (size_t)E * sizeof(float));
    rel(&o);
    Py_RETURN_NONE;
}

static PyObject *bal_set_bias(PyObject *self, PyObject *arg) {
    dsmoe_balancer *b = ((BalancerObject *)self)->b;
    int32_t E = dsmoe_balancer_get_config(b)->n_experts;
    Py_buffer o;
    if (get_buf(arg, &o, K_F32, E, 0, 0, "bias")) return NULL;
    dsmoe_status st = dsmoe_balancer_set_bias(b, o.buf);
    rel(&o);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *bal_center_bias(PyObject *self, PyObject *unused) {
    (void)unused;
    dsmoe_balancer_center_bias(((BalancerObject *)self)->b);
    Py_RETURN_NONE;
}

static PyObject *bal_accumulate_counts(PyObject *self, PyObject *args) {
    dsmoe_balancer *b = ((BalancerObject *)self)->b;
    PyObject *co;
    long long n;
    if (!PyArg_ParseTuple(args, "OL", &co, &n)) return NULL;
    Py_buffer c;
    if (get_buf(co, &c, K_I64, dsmoe_balancer_get_config(b)->n_experts, 0, 0, "counts"))
        return NULL;
    dsmoe_status st = dsmoe_balancer_accumulate_counts(b, c.buf, n);
    rel(&c);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

/* accumulate(indices (T, K) int32, mask (T) uint8 or None, T, K) */
static PyObject *bal_accumulate(PyObject *self, PyObject *args) {
    dsmoe_balancer *b = ((BalancerObject *)self)->b;
    PyObject *io, *mo;
    Py_ssize_t T;
    int K;
    if (!PyArg_ParseTuple(args, "OOni", &io, &mo, &T, &K)) return NULL;
    Py_buffer bi, bm;
    if (get_buf(io, &bi, K_I32, T * K, 0, 0, "indices")) return NULL;
    if (get_buf(mo, &bm, K_U8, T, 0, 1, "mask")) {
        rel(&bi);
        return NULL;
    }
    dsmoe_status st = dsmoe_balancer_accumulate(b, bi.buf, bm.buf, T, K);
    rel(&bi), rel(&bm);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *bal_step(PyObject *self, PyObject *unused) {
    (void)unused;
    dsmoe_status st = dsmoe_balancer_step(((BalancerObject *)self)->b);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

/* info() -> (E, steps, tokens, pending_tokens, last_gamma, rule, gamma, until, after, recenter) */
static PyObject *bal_info(PyObject *self, PyObject *unused) {
    (void)unused;
    dsmoe_balancer *b = ((BalancerObject *)self)->b;
    dsmoe_balancer_info i;
    dsmoe_balancer_get_info(b, &i);
    const dsmoe_balancer_config *c = dsmoe_balancer_get_config(b);
    return Py_BuildValue("iLLLdidLdi", i.n_experts, (long long)i.steps, (long long)i.tokens,
                         (long long)i.pending_tokens, (double)i.last_gamma, (int)c->rule,
                         (double)c->gamma, (long long)c->gamma_until_tokens,
                         (double)c->gamma_after, (int)c->recenter);
}

/* counts(which: 0 pending, 1 last, 2 total, out (E) int64) */
static PyObject *bal_counts(PyObject *self, PyObject *args) {
    dsmoe_balancer *b = ((BalancerObject *)self)->b;
    int which;
    PyObject *oo;
    if (!PyArg_ParseTuple(args, "iO", &which, &oo)) return NULL;
    int32_t E = dsmoe_balancer_get_config(b)->n_experts;
    Py_buffer o;
    if (get_buf(oo, &o, K_I64, E, 1, 0, "counts")) return NULL;
    const int64_t *src = which == 0   ? dsmoe_balancer_counts_pending(b)
                         : which == 1 ? dsmoe_balancer_counts_last(b)
                                      : dsmoe_balancer_counts_total(b);
    memcpy(o.buf, src, (size_t)E * sizeof(int64_t));
    rel(&o);
    Py_RETURN_NONE;
}

static PyObject *bal_save(PyObject *self, PyObject *args) {
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path)) return NULL;
    dsmoe_status st = dsmoe_balancer_save(((BalancerObject *)self)->b, PyBytes_AS_STRING(path));
    Py_DECREF(path);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyMethodDef bal_methods[] = {
    {"bias", bal_bias, METH_O, NULL},
    {"set_bias", bal_set_bias, METH_O, NULL},
    {"center_bias", bal_center_bias, METH_NOARGS, NULL},
    {"accumulate_counts", bal_accumulate_counts, METH_VARARGS, NULL},
    {"accumulate", bal_accumulate, METH_VARARGS, NULL},
    {"step", bal_step, METH_NOARGS, NULL},
    {"info", bal_info, METH_NOARGS, NULL},
    {"counts", bal_counts, METH_VARARGS, NULL},
    {"save", bal_save, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyTypeObject BalancerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dsmoe._dsmoe.BalancerHandle",
    .tp_basicsize = sizeof(BalancerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An owned dsmoe_balancer (use dsmoe.Balancer).",
    .tp_dealloc = bal_dealloc,
    .tp_methods = bal_methods,
};

/* ----------------------------------------------------------- balance losses -- */

/* balance_loss(kind, alpha, seq_len, count_from, normalize_scores, n_devices, device_topm,
 *              cfg, scores, indices|None, logits|None, dlogits|None, T, threads) -> float */
static PyObject *py_balance_loss(PyObject *self, PyObject *args) {
    (void)self;
    const char *kind;
    float alpha;
    long long seq_len;
    int count_from, norm, ndev, dtopm, threads;
    PyObject *cfgo, *so, *io, *lo, *dlo;
    Py_ssize_t T;
    if (!PyArg_ParseTuple(args, "sfLipiiOOOOOni", &kind, &alpha, &seq_len, &count_from, &norm,
                          &ndev, &dtopm, &cfgo, &so, &io, &lo, &dlo, &T, &threads))
        return NULL;
    const dsmoe_router_config *c = as_rc(cfgo);
    if (!c) return NULL;
    dsmoe_balance_loss_config lc;
    dsmoe_balance_loss_kind k;
    dsmoe_status st = dsmoe_balance_loss_kind_parse(kind, &k);
    if (st != DSMOE_OK) return raise_status(st);
    dsmoe_balance_loss_config_default(k, &lc);
    if (!isnan(alpha)) lc.alpha = alpha; /* NaN: the kind's default */
    lc.seq_len = seq_len;
    lc.count_from = (dsmoe_balance_count)count_from;
    lc.normalize_scores = norm;
    lc.n_devices = ndev;
    lc.device_topm = dtopm;
    Py_ssize_t E = c->n_experts, K = c->top_k;
    Py_buffer bs, bi, bl, bd;
    memset(&bi, 0, sizeof bi), memset(&bl, 0, sizeof bl), memset(&bd, 0, sizeof bd);
    PyObject *ret = NULL;
    if (get_buf(so, &bs, K_F32, T * E, 0, 0, "scores")) return NULL;
    if (get_buf(io, &bi, K_I32, T * K, 0, 1, "indices") ||
        get_buf(lo, &bl, K_F32, T * E, 0, 1, "logits") ||
        get_buf(dlo, &bd, K_F32, T * E, 1, 1, "dlogits"))
        goto done;
    size_t wsn = dsmoe_balance_loss_workspace_size(&lc, c, T);
    if (wsn == 0) {
        /* invalid config: let the call report it by name */
        wsn = 64;
    }
    void *ws = scratch_get(wsn);
    if (!ws) goto done;
    double loss = 0;
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_balance_loss(&lc, c, &loss, bd.buf, bs.buf, bi.buf, bl.buf, T, ws, wsn, threads);
    Py_END_ALLOW_THREADS
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    ret = PyFloat_FromDouble(loss);
done:
    rel(&bs), rel(&bi), rel(&bl), rel(&bd);
    return ret;
}

/* load_stats(counts (E) int64, G) -> dict */
static PyObject *py_load_stats(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *co;
    int G;
    if (!PyArg_ParseTuple(args, "Oi", &co, &G)) return NULL;
    Py_buffer c;
    if (get_buf(co, &c, K_I64, -1, 0, 0, "counts")) return NULL;
    Py_ssize_t E = c.len / 8;
    if (E > DSMOE_MAX_EXPERTS) E = DSMOE_MAX_EXPERTS + 1; /* the library names the limit */
    dsmoe_load_stats s;
    dsmoe_status st = dsmoe_load_stats_compute(c.buf, (int32_t)E, G, &s);
    rel(&c);
    if (st != DSMOE_OK) return raise_status(st);
    return Py_BuildValue(
        "{s:i,s:L,s:d,s:L,s:L,s:i,s:d,s:d,s:d,s:i,s:i,s:d,s:d}", "n_experts", s.n_experts,
        "total", (long long)s.total, "mean", s.mean, "max", (long long)s.max, "min",
        (long long)s.min, "argmax", s.argmax, "maxvio", s.maxvio, "cv", s.cv, "entropy",
        s.entropy, "dead", s.dead, "n_groups", s.n_groups, "group_maxvio", s.group_maxvio,
        "group_cv", s.group_cv);
}

/* load_counts(counts_out (E) int64, indices (T, K) int32, mask|None, T, K, E) */
static PyObject *py_load_counts(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *co, *io, *mo;
    Py_ssize_t T;
    int K, E;
    if (!PyArg_ParseTuple(args, "OOOnii", &co, &io, &mo, &T, &K, &E)) return NULL;
    Py_buffer c, bi, bm;
    memset(&bi, 0, sizeof bi), memset(&bm, 0, sizeof bm);
    PyObject *ret = NULL;
    if (get_buf(co, &c, K_I64, E, 1, 0, "counts")) return NULL;
    if (get_buf(io, &bi, K_I32, T * K, 0, 0, "indices") ||
        get_buf(mo, &bm, K_U8, T, 0, 1, "mask"))
        goto done;
    dsmoe_status st = dsmoe_load_counts(c.buf, bi.buf, bm.buf, T, K, E);
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    rel(&c), rel(&bi), rel(&bm);
    return ret;
}

/* -------------------------------------------------------------------- MoE -- */

typedef struct {
    PyObject_HEAD
    dsmoe_moe *moe;
    PyObject *params_owner; /* caller's parameter buffer, kept alive (or NULL) */
    PyObject *grads_owner;
    Py_buffer pbuf, gbuf;
    uint64_t forwards;      /* successful forwards (the backward's freshness check) */
    PyThread_type_lock lock; /* one call at a time: a layer is not reentrant, and its
                                forward and backward run without the GIL */
} MoEObject;

static PyTypeObject MoEType;

static void moe_dealloc(PyObject *self) {
    MoEObject *o = (MoEObject *)self;
    dsmoe_moe_free(o->moe);
    if (o->lock) PyThread_free_lock(o->lock);
    rel(&o->pbuf), rel(&o->gbuf);
    Py_XDECREF(o->params_owner);
    Py_XDECREF(o->grads_owner);
    Py_TYPE(self)->tp_free(self);
}

static MoEObject *moe_new(void) {
    MoEObject *o = PyObject_New(MoEObject, &MoEType);
    if (!o) return NULL;
    o->moe = NULL;
    o->params_owner = o->grads_owner = NULL;
    memset(&o->pbuf, 0, sizeof o->pbuf), memset(&o->gbuf, 0, sizeof o->gbuf);
    o->forwards = 0;
    o->lock = PyThread_allocate_lock();
    if (!o->lock) {
        Py_DECREF(o);
        PyErr_NoMemory();
        return NULL;
    }
    return o;
}

/* Takes the layer's lock, waiting with the GIL released if another thread has it. */
static void moe_lock(PyObject *self) {
    MoEObject *o = (MoEObject *)self;
    if (!PyThread_acquire_lock(o->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(o->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static void moe_unlock(PyObject *self) { PyThread_release_lock(((MoEObject *)self)->lock); }

/* moe_load(path, prefix|None, cfg|None (router used for files without a saved config),
 *          n_shared, max_tokens, threads, bf16, capacity_factor) */
static PyObject *py_moe_load(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *path, *prefo, *cfgo;
    int n_shared, threads, bf16;
    long long max_tokens;
    float capacity;
    if (!PyArg_ParseTuple(args, "O&OOiLipf", PyUnicode_FSConverter, &path, &prefo, &cfgo,
                          &n_shared, &max_tokens, &threads, &bf16, &capacity))
        return NULL;
    const char *prefix = NULL;
    if (prefo != Py_None) {
        prefix = PyUnicode_AsUTF8(prefo);
        if (!prefix) {
            Py_DECREF(path);
            return NULL;
        }
    }
    dsmoe_moe_config opts;
    dsmoe_moe_config_default(&opts);
    if (cfgo != Py_None) {
        const dsmoe_router_config *c = as_rc(cfgo);
        if (!c) {
            Py_DECREF(path);
            return NULL;
        }
        opts.router = *c;
    }
    opts.n_shared = n_shared;
    opts.max_tokens = max_tokens;
    opts.n_threads = threads;
    opts.weight_dtype = bf16 ? DSMOE_DTYPE_BF16 : DSMOE_DTYPE_F32;
    opts.capacity_factor = capacity;
    MoEObject *o = moe_new();
    if (!o) {
        Py_DECREF(path);
        return NULL;
    }
    dsmoe_status st;
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_moe_load(p, prefix, &opts, &o->moe);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (st != DSMOE_OK) {
        Py_DECREF(o);
        return raise_status(st);
    }
    return (PyObject *)o;
}

/* moe_param_count(cfg, D, F, n_shared) -> int */
static int moe_cfg(dsmoe_moe_config *m, PyObject *cfgo, int D, int F, int n_shared,
                   int train, long long max_tokens, int threads, float capacity) {
    const dsmoe_router_config *c = as_rc(cfgo);
    if (!c) return -1;
    dsmoe_moe_config_default(m);
    m->router = *c;
    m->hidden_size = D;
    m->expert_size = F;
    m->n_shared = n_shared;
    m->train = train;
    m->max_tokens = max_tokens;
    m->n_threads = threads;
    m->capacity_factor = capacity;
    return 0;
}

static PyObject *py_moe_param_count(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cfgo;
    int D, F, ns;
    if (!PyArg_ParseTuple(args, "Oiii", &cfgo, &D, &F, &ns)) return NULL;
    dsmoe_moe_config m;
    if (moe_cfg(&m, cfgo, D, F, ns, 1, 1, 1, 0)) return NULL;
    dsmoe_status st = dsmoe_moe_config_validate(&m);
    if (st != DSMOE_OK) return raise_status(st);
    return PyLong_FromSize_t(dsmoe_moe_param_count(&m));
}

/* moe_create(cfg, D, F, n_shared, train, max_tokens, threads, capacity, params, grads|None):
 * a layer on the caller's flat parameter (and gradient) buffers, 64-byte aligned. */
static PyObject *py_moe_create(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cfgo, *po, *go;
    int D, F, ns, train, threads;
    long long max_tokens;
    float capacity;
    if (!PyArg_ParseTuple(args, "OiiipLifOO", &cfgo, &D, &F, &ns, &train, &max_tokens, &threads,
                          &capacity, &po, &go))
        return NULL;
    dsmoe_moe_config m;
    if (moe_cfg(&m, cfgo, D, F, ns, train, max_tokens, threads, capacity)) return NULL;
    dsmoe_status st = dsmoe_moe_config_validate(&m);
    if (st != DSMOE_OK) return raise_status(st);
    Py_ssize_t n = (Py_ssize_t)dsmoe_moe_param_count(&m);
    MoEObject *o = moe_new();
    if (!o) return NULL;
    if (get_buf(po, &o->pbuf, K_F32, n, 1, 0, "params") ||
        get_buf(go, &o->gbuf, K_F32, n, 1, 1, "grads")) {
        Py_DECREF(o);
        return NULL;
    }
    /* the layer zeroes the caller's buffers: keep their values */
    float *keep = PyMem_Malloc((size_t)n * sizeof(float) + 1);
    if (!keep) {
        Py_DECREF(o);
        return PyErr_NoMemory();
    }
    memcpy(keep, o->pbuf.buf, (size_t)n * sizeof(float));
    dsmoe_moe_buffers b = {o->pbuf.buf, o->gbuf.buf, NULL, 0};
    st = dsmoe_moe_create_with(&m, &b, &o->moe);
    if (st == DSMOE_OK) memcpy(o->pbuf.buf, keep, (size_t)n * sizeof(float));
    PyMem_Free(keep);
    if (st != DSMOE_OK) {
        Py_DECREF(o);
        return raise_status(st);
    }
    return (PyObject *)o;
}

static dsmoe_moe *moe_of(PyObject *o) { return ((MoEObject *)o)->moe; }

/* tensors() -> [(name, shape tuple, offset in floats or -1, grad offset or -1, trainable)] */
static PyObject *moe_tensors_unlocked(PyObject *self, PyObject *unused) {
    (void)unused;
    MoEObject *o = (MoEObject *)self;
    dsmoe_moe *moe = o->moe;
    size_t np = 0;
    const char *pbase = o->pbuf.buf ? o->pbuf.buf : (const char *)dsmoe_moe_params(moe, &np);
    const char *gbase = o->gbuf.buf ? o->gbuf.buf : (const char *)dsmoe_moe_grads(moe, &np);
    int64_t n = dsmoe_moe_tensor_count(moe);
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        if (dsmoe_moe_tensor_at(moe, i, &t) != DSMOE_OK) continue;
        long long off = -1, goff = -1;
        if (pbase && t.trainable && t.dtype == DSMOE_DTYPE_F32)
            off = (long long)(((const char *)t.data - pbase) / 4);
        if (gbase && t.grad) goff = (long long)(((const char *)t.grad - gbase) / 4);
        PyObject *shape = t.ndim == 1 ? Py_BuildValue("(L)", (long long)t.shape[0])
                                      : Py_BuildValue("(LL)", (long long)t.shape[0],
                                                      (long long)t.shape[1]);
        PyObject *item = shape ? Py_BuildValue("(sNLLi)", t.name, shape, off, goff, t.trainable)
                               : NULL;
        if (!item || PyList_Append(list, item) != 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* tensor_copy(name, out float32): the tensor's values as fp32 (bf16 widened). */
static PyObject *moe_tensor_copy_unlocked(PyObject *self, PyObject *args) {
    const char *name;
    PyObject *oo;
    if (!PyArg_ParseTuple(args, "sO", &name, &oo)) return NULL;
    dsmoe_moe_tensor t;
    dsmoe_status st = dsmoe_moe_tensor_get(moe_of(self), name, &t);
    if (st != DSMOE_OK) return raise_status(st);
    Py_ssize_t n = t.ndim == 1 ? t.shape[0] : t.shape[0] * t.shape[1];
    Py_buffer o;
    if (get_buf(oo, &o, K_F32, n, 1, 0, "out")) return NULL;
    float *dst = o.buf;
    int64_t rows = t.ndim == 1 ? 1 : t.shape[0], cols = t.ndim == 1 ? t.shape[0] : t.shape[1];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            int64_t src = t.layout == DSMOE_MOE_LAYOUT_PACKED
                              ? ((r / 16) * cols + c) * 16 + r % 16
                              : r * cols + c;
            dst[r * cols + c] = t.dtype == DSMOE_DTYPE_BF16
                                    ? dsmoe_bf16_to_f32(((const uint16_t *)t.data)[src])
                                    : ((const float *)t.data)[src];
        }
    rel(&o);
    Py_RETURN_NONE;
}

/* config() -> (D, F, n_shared, E, K, train, max_tokens, RouterConfig) */
static PyObject *moe_config(PyObject *self, PyObject *unused) {
    (void)unused;
    const dsmoe_moe_config *c = dsmoe_moe_get_config(moe_of(self));
    RouterConfigObject *r = PyObject_New(RouterConfigObject, &RouterConfigType);
    if (!r) return NULL;
    r->cfg = c->router;
    return Py_BuildValue("iiiiiiLN", c->hidden_size, c->expert_size, c->n_shared,
                         c->router.n_experts, c->router.top_k, c->train,
                         (long long)c->max_tokens, (PyObject *)r);
}

static PyObject *moe_set_bias_unlocked(PyObject *self, PyObject *arg) {
    dsmoe_moe *m = moe_of(self);
    Py_buffer b;
    if (get_buf(arg, &b, K_F32, dsmoe_moe_get_config(m)->router.n_experts, 0, 0, "bias"))
        return NULL;
    dsmoe_status st = dsmoe_moe_set_bias(m, b.buf);
    rel(&b);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *moe_get_bias_unlocked(PyObject *self, PyObject *arg) {
    dsmoe_moe *m = moe_of(self);
    const float *src = dsmoe_moe_bias(m);
    if (!src) Py_RETURN_FALSE;
    Py_buffer b;
    if (get_buf(arg, &b, K_F32, dsmoe_moe_get_config(m)->router.n_experts, 1, 0, "bias"))
        return NULL;
    memcpy(b.buf, src, (size_t)b.len);
    rel(&b);
    Py_RETURN_TRUE;
}

/* forward(y, x, T, threads, indices|None, weights|None, scores|None, logits|None,
 *         counts|None) -> n_dropped */
static PyObject *moe_forward_unlocked(PyObject *self, PyObject *args) {
    MoEObject *mo = (MoEObject *)self;
    PyObject *yo, *xo, *io, *wo, *so, *lo, *co;
    Py_ssize_t T;
    int threads;
    if (!PyArg_ParseTuple(args, "OOniOOOOO", &yo, &xo, &T, &threads, &io, &wo, &so, &lo, &co))
        return NULL;
    const dsmoe_moe_config *c = dsmoe_moe_get_config(mo->moe);
    Py_ssize_t D = c->hidden_size, E = c->router.n_experts, K = c->router.top_k;
    Py_buffer by, bx, bi, bw, bs, bl, bc;
    memset(&bx, 0, sizeof bx), memset(&bi, 0, sizeof bi), memset(&bw, 0, sizeof bw);
    memset(&bs, 0, sizeof bs), memset(&bl, 0, sizeof bl), memset(&bc, 0, sizeof bc);
    PyObject *ret = NULL;
    if (get_buf(yo, &by, K_F32, T * D, 1, 0, "y")) return NULL;
    if (get_buf(xo, &bx, K_F32, T * D, 0, 0, "x") ||
        get_buf(io, &bi, K_I32, T * K, 1, 1, "indices") ||
        get_buf(wo, &bw, K_F32, T * K, 1, 1, "weights") ||
        get_buf(so, &bs, K_F32, T * E, 1, 1, "scores") ||
        get_buf(lo, &bl, K_F32, T * E, 1, 1, "logits") ||
        get_buf(co, &bc, K_I64, E, 1, 1, "counts"))
        goto done;
    dsmoe_status st;
    dsmoe_moe_routing_out r = {bi.buf, bw.buf, bs.buf, bl.buf, bc.buf, 0};
    int chunked = T > c->max_tokens || T == 0;
    Py_BEGIN_ALLOW_THREADS
    if (chunked)
        st = dsmoe_moe_forward_chunked(mo->moe, by.buf, bx.buf, T, threads, &r);
    else
        st = dsmoe_moe_forward(mo->moe, by.buf, bx.buf, T, threads);
    Py_END_ALLOW_THREADS
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    if (!chunked) {
        const dsmoe_moe_routing *lr = dsmoe_moe_last_routing(mo->moe);
        if (bi.buf) memcpy(bi.buf, lr->indices, (size_t)bi.len);
        if (bw.buf) memcpy(bw.buf, lr->weights, (size_t)bw.len);
        if (bs.buf) memcpy(bs.buf, lr->scores, (size_t)bs.len);
        if (bl.buf) memcpy(bl.buf, lr->logits, (size_t)bl.len);
        if (bc.buf) memcpy(bc.buf, lr->counts, (size_t)bc.len);
        r.n_dropped = lr->n_dropped;
        mo->forwards++;
    }
    ret = Py_BuildValue("LK", (long long)r.n_dropped,
                        (unsigned long long)(chunked ? 0 : mo->forwards));
done:
    rel(&by), rel(&bx), rel(&bi), rel(&bw), rel(&bs), rel(&bl), rel(&bc);
    return ret;
}

/* backward(dx|None (+=), dy, x, dlogits_extra|None, T, threads, forward_id) */
static PyObject *moe_backward_unlocked(PyObject *self, PyObject *args) {
    MoEObject *mo = (MoEObject *)self;
    PyObject *dxo, *dyo, *xo, *deo;
    Py_ssize_t T;
    int threads;
    unsigned long long fid;
    if (!PyArg_ParseTuple(args, "OOOOniK", &dxo, &dyo, &xo, &deo, &T, &threads, &fid))
        return NULL;
    if (fid != mo->forwards) {
        PyErr_SetString(PyExc_RuntimeError,
                        "dsmoe MoE backward: the layer ran another forward since the one being "
                        "differentiated (one forward per backward)");
        return NULL;
    }
    const dsmoe_moe_config *c = dsmoe_moe_get_config(mo->moe);
    Py_ssize_t D = c->hidden_size, E = c->router.n_experts;
    Py_buffer bdx, bdy, bx, be;
    memset(&bdy, 0, sizeof bdy), memset(&bx, 0, sizeof bx), memset(&be, 0, sizeof be);
    PyObject *ret = NULL;
    if (get_buf(dxo, &bdx, K_F32, T * D, 1, 1, "dx")) return NULL;
    if (get_buf(dyo, &bdy, K_F32, T * D, 0, 0, "dy") ||
        get_buf(xo, &bx, K_F32, T * D, 0, 0, "x") ||
        get_buf(deo, &be, K_F32, T * E, 0, 1, "dlogits_extra"))
        goto done;
    dsmoe_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_moe_backward(mo->moe, bdx.buf, bdy.buf, bx.buf, be.buf, T, threads);
    Py_END_ALLOW_THREADS
    if (st != DSMOE_OK) {
        raise_status(st);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    rel(&bdx), rel(&bdy), rel(&bx), rel(&be);
    return ret;
}

static PyObject *moe_init_random_unlocked(PyObject *self, PyObject *args) {
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "K", &seed)) return NULL;
    dsmoe_moe_init_random(moe_of(self), seed);
    Py_RETURN_NONE;
}

static PyObject *moe_forwards(PyObject *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong(((MoEObject *)self)->forwards);
}

static PyObject *moe_zero_grad_unlocked(PyObject *self, PyObject *unused) {
    (void)unused;
    dsmoe_moe_zero_grad(moe_of(self));
    Py_RETURN_NONE;
}

static PyObject *moe_save_unlocked(PyObject *self, PyObject *args) {
    PyObject *path;
    const char *prefix;
    if (!PyArg_ParseTuple(args, "O&s", PyUnicode_FSConverter, &path, &prefix)) return NULL;
    dsmoe_status st;
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_moe_save(moe_of(self), p, prefix);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

/* The methods as Python sees them: each runs its _unlocked body holding the layer's lock
 * (one call at a time per layer; the GIL is released inside for the C work). */
#define MOE_LOCKED(name)                                                                       \
    static PyObject *name(PyObject *self, PyObject *arg) {                                     \
        moe_lock(self);                                                                        \
        PyObject *r = name##_unlocked(self, arg);                                              \
        moe_unlock(self);                                                                      \
        return r;                                                                              \
    }
MOE_LOCKED(moe_tensors)
MOE_LOCKED(moe_tensor_copy)
MOE_LOCKED(moe_set_bias)
MOE_LOCKED(moe_get_bias)
MOE_LOCKED(moe_forward)
MOE_LOCKED(moe_backward)
MOE_LOCKED(moe_init_random)
MOE_LOCKED(moe_zero_grad)
MOE_LOCKED(moe_save)
#undef MOE_LOCKED

static PyMethodDef moe_methods[] = {
    {"tensors", moe_tensors, METH_NOARGS, NULL},
    {"tensor_copy", moe_tensor_copy, METH_VARARGS, NULL},
    {"config", moe_config, METH_NOARGS, NULL},
    {"set_bias", moe_set_bias, METH_O, NULL},
    {"get_bias", moe_get_bias, METH_O, NULL},
    {"forward", moe_forward, METH_VARARGS, NULL},
    {"backward", moe_backward, METH_VARARGS, NULL},
    {"zero_grad", moe_zero_grad, METH_NOARGS, NULL},
    {"forwards", moe_forwards, METH_NOARGS, NULL},
    {"init_random", moe_init_random, METH_VARARGS, NULL},
    {"save", moe_save, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyTypeObject MoEType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dsmoe._dsmoe.MoEHandle",
    .tp_basicsize = sizeof(MoEObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An owned dsmoe_moe layer (use dsmoe.MoE).",
    .tp_dealloc = moe_dealloc,
    .tp_methods = moe_methods,
};

/* ------------------------------------------------------------------ model -- */

typedef struct {
    PyObject_HEAD
    dsmoe_model *m;
    dsmoe_model_cache *cache; /* the object's own sequence (logits / generate) */
} ModelObject;

static PyTypeObject ModelType;

static void model_dealloc(PyObject *self) {
    ModelObject *o = (ModelObject *)self;
    dsmoe_model_cache_free(o->cache);
    dsmoe_model_free(o->m);
    Py_TYPE(self)->tp_free(self);
}

/* model_open(dir, threads, max_tokens, widen_f32) */
static PyObject *py_model_open(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *path;
    int threads, max_tokens, widen;
    if (!PyArg_ParseTuple(args, "O&iip", PyUnicode_FSConverter, &path, &threads, &max_tokens,
                          &widen))
        return NULL;
    dsmoe_model_options opts;
    dsmoe_model_options_default(&opts);
    opts.n_threads = threads;
    if (max_tokens > 0) opts.max_tokens = max_tokens;
    opts.widen_f32 = widen;
    ModelObject *o = PyObject_New(ModelObject, &ModelType);
    if (!o) {
        Py_DECREF(path);
        return NULL;
    }
    o->m = NULL;
    o->cache = NULL;
    dsmoe_status st;
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_model_open(p, &opts, &o->m);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (st != DSMOE_OK) {
        Py_DECREF(o);
        return raise_status(st);
    }
    return (PyObject *)o;
}

static PyObject *model_config(PyObject *self, PyObject *unused) {
    (void)unused;
    const dsmoe_model_config *c = dsmoe_model_get_config(((ModelObject *)self)->m);
    return Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:L,s:i,s:i,s:i}", "vocab_size", c->vocab_size,
        "hidden_size", c->hidden_size, "num_hidden_layers", c->num_hidden_layers,
        "num_attention_heads", c->num_attention_heads, "n_routed_experts", c->n_routed_experts,
        "num_experts_per_tok", c->num_experts_per_tok, "kv_lora_rank", c->kv_lora_rank,
        "first_k_dense_replace", c->first_k_dense_replace, "max_position_embeddings",
        (long long)c->max_position_embeddings, "byte_vocab", c->byte_vocab, "bos_token_id",
        c->bos_token_id, "eos_token_id", c->eos_token_id);
}

/* reset(capacity): the object's cache emptied, with room for capacity positions. */
static PyObject *model_reset(PyObject *self, PyObject *args) {
    ModelObject *o = (ModelObject *)self;
    long long cap;
    if (!PyArg_ParseTuple(args, "L", &cap)) return NULL;
    if (o->cache && dsmoe_model_cache_capacity(o->cache) >= cap) {
        dsmoe_model_cache_truncate(o->cache, 0);
        Py_RETURN_NONE;
    }
    dsmoe_model_cache *c = NULL;
    dsmoe_status st = dsmoe_model_cache_create(o->m, cap, &c);
    if (st != DSMOE_OK) return raise_status(st);
    dsmoe_model_cache_free(o->cache);
    o->cache = c;
    Py_RETURN_NONE;
}

static PyObject *model_length(PyObject *self, PyObject *unused) {
    (void)unused;
    ModelObject *o = (ModelObject *)self;
    return PyLong_FromLongLong(o->cache ? (long long)dsmoe_model_cache_length(o->cache) : 0);
}

/* forward(tokens int32 (T), logits float32 (T, V) | (V) | None, flags) */
static PyObject *model_forward(PyObject *self, PyObject *args) {
    ModelObject *o = (ModelObject *)self;
    PyObject *to, *lo;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "OOI", &to, &lo, &flags)) return NULL;
    if (!o->cache) {
        PyErr_SetString(PyExc_RuntimeError, "model: no cache (call reset first)");
        return NULL;
    }
    Py_buffer bt, bl;
    if (get_buf(to, &bt, K_I32, -1, 0, 0, "tokens")) return NULL;
    Py_ssize_t T = bt.len / 4;
    Py_ssize_t V = dsmoe_model_get_config(o->m)->vocab_size;
    if (get_buf(lo, &bl, K_F32, (flags & DSMOE_MODEL_LOGITS_LAST) ? V : T * V, 1, 1, "logits")) {
        rel(&bt);
        return NULL;
    }
    dsmoe_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dsmoe_model_forward(o->m, o->cache, bt.buf, T, bl.buf, flags);
    Py_END_ALLOW_THREADS
    rel(&bt), rel(&bl);
    if (st != DSMOE_OK) return raise_status(st);
    Py_RETURN_NONE;
}

static PyMethodDef model_methods[] = {
    {"config", model_config, METH_NOARGS, NULL},
    {"reset", model_reset, METH_VARARGS, NULL},
    {"length", model_length, METH_NOARGS, NULL},
    {"forward", model_forward, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dsmoe._dsmoe.ModelHandle",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An owned dsmoe_model with one cache (use dsmoe.Model).",
    .tp_dealloc = model_dealloc,
    .tp_methods = model_methods,
};

/* sample(logits float32 (V), temperature, top_p, rng_state) -> (id, new rng_state) */
static PyObject *py_sample(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *lo;
    float temp, top_p;
    unsigned long long state;
    if (!PyArg_ParseTuple(args, "OffK", &lo, &temp, &top_p, &state)) return NULL;
    Py_buffer bl;
    if (get_buf(lo, &bl, K_F32, -1, 0, 0, "logits")) return NULL;
    Py_ssize_t V = bl.len / 4;
    float *tmp = scratch_get((size_t)(2 * V + 1) * sizeof(float));
    if (!tmp) {
        rel(&bl);
        return NULL;
    }
    dsmoe_rng rng = {state};
    int32_t id = dsmoe_sample(bl.buf, (int32_t)V, temp, top_p, &rng, tmp);
    rel(&bl);
    if (id < 0) return raise_status(DSMOE_STATUS_INVALID_ARGUMENT);
    return Py_BuildValue("iK", id, (unsigned long long)rng.state);
}

static PyObject *py_rng_seed(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "K", &seed)) return NULL;
    dsmoe_rng r;
    dsmoe_rng_seed(&r, seed);
    return PyLong_FromUnsignedLongLong(r.state);
}

/* ----------------------------------------------------------------- module -- */

static PyObject *py_version(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyUnicode_FromString(dsmoe_version());
}

static PyObject *py_isa(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyUnicode_FromString(dsmoe_isa());
}

static PyObject *py_preset_names(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (const char *const *p = dsmoe_router_preset_names(); *p; p++) {
        PyObject *s = PyUnicode_FromString(*p);
        if (!s || PyList_Append(l, s) != 0) {
            Py_XDECREF(s);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(s);
    }
    return l;
}

static PyMethodDef module_methods[] = {
    {"version", py_version, METH_NOARGS, "libdsmoe's version string."},
    {"isa", py_isa, METH_NOARGS, "The kernel set in use (avx512, avx2, ref)."},
    {"preset_names", py_preset_names, METH_NOARGS, "Router preset names."},
    {"router_config", py_router_config, METH_VARARGS, "router_config(preset, overrides)"},
    {"route", (PyCFunction)(void (*)(void))py_route_fast, METH_FASTCALL | METH_KEYWORDS,
     "route(logits, bias=None, preset=\"deepseek-v3\", *, threads=1, scores=False, "
     "counts=False, **overrides)\n--\n\n"
     "Routes T tokens from router logits (T, E) with dsmoe_router_forward.\n\n"
     "Returns (indices int32 (T, K), weights float32 (T, K)), plus scores (T, E) (the\n"
     "affinities before the bias) when scores=True and counts (E) int64 (tokens per\n"
     "expert) when counts=True. bias (E): the selection bias (e_score_correction_bias);\n"
     "None routes with zeros when the config uses one. preset / overrides: see\n"
     "router_config. threads: library threads (<= 0: all); the results are the same\n"
     "for any count. Arrays that are C-contiguous float32 are used in place."},
    {"set_route_fallback", py_set_route_fallback, METH_VARARGS,
     "set_route_fallback(python_route, default_config)"},
    {"route_new", (PyCFunction)(void (*)(void))py_route_new, METH_FASTCALL,
     "dsmoe_router_forward into new arrays (None: convert the inputs first)"},
    {"set_allocator", py_set_allocator, METH_VARARGS, "set_allocator(numpy.empty, f32, i32, i64)"},
    {"route_hidden", py_route_hidden, METH_VARARGS, "dsmoe_router_forward_hidden"},
    {"router_backward", py_router_backward, METH_VARARGS, "dsmoe_router_backward"},
    {"bench_route_c", py_bench_route_c, METH_VARARGS, "seconds per bare C route call"},
    {"balancer_create", py_balancer_create, METH_VARARGS, "dsmoe_balancer_create"},
    {"balancer_load", py_balancer_load, METH_VARARGS, "dsmoe_balancer_load"},
    {"balance_loss", py_balance_loss, METH_VARARGS, "dsmoe_balance_loss"},
    {"load_stats", py_load_stats, METH_VARARGS, "dsmoe_load_stats_compute"},
    {"load_counts", py_load_counts, METH_VARARGS, "dsmoe_load_counts"},
    {"moe_load", py_moe_load, METH_VARARGS, "dsmoe_moe_load"},
    {"moe_param_count", py_moe_param_count, METH_VARARGS, "dsmoe_moe_param_count"},
    {"moe_create", py_moe_create, METH_VARARGS, "dsmoe_moe_create_with"},
    {"model_open", py_model_open, METH_VARARGS, "dsmoe_model_open"},
    {"sample", py_sample, METH_VARARGS, "dsmoe_sample"},
    {"rng_seed", py_rng_seed, METH_VARARGS, "dsmoe_rng_seed: the state for a seed"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_dsmoe",
                                        "CPython binding of libdsmoe (use the dsmoe package).",
                                        -1, module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__dsmoe(void);
PyMODINIT_FUNC PyInit__dsmoe(void) {
    static int key_made = 0;
    if (!key_made) {
        if (pthread_key_create(&scratch_key, scratch_destroy) != 0) return PyErr_NoMemory();
        key_made = 1;
    }
    if (PyType_Ready(&RouterConfigType) < 0 || PyType_Ready(&BalancerType) < 0 ||
        PyType_Ready(&MoEType) < 0 || PyType_Ready(&ModelType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_EXPERTS", DSMOE_MAX_EXPERTS) < 0 ||
        PyModule_AddObjectRef(m, "RouterConfig", (PyObject *)&RouterConfigType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
