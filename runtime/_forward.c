/* The broker's hot path in C: take whole messages off a socket and put pairs of
 * frames on another, on the sockets pyzmq made (runtime/broker.py).
 *
 * Measured in benchmarks/bus.py at 10k msg/s: the all-Python loop spent about 21 us of
 * interpreter time per message, most of it in pyzmq's recv/send wrappers and the glue
 * around them, and every microsecond the broker holds a CPU on a 2-core machine shows
 * in the p99. The checks (decode,
 * ACL, sender) stay in Python; only the socket calls are here.
 *
 * No zmq.h and no link to libzmq: the functions are looked up in the libzmq that
 * pyzmq already loaded (dlsym on pyzmq's own extension module searches its
 * dependencies), so the socket handles pyzmq gives (Socket.underlying) are valid here
 * whether pyzmq bundles libzmq or uses the system's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>

/* zmq.h: an opaque 64-byte message, pointer-aligned; these flags are libzmq's ABI */
typedef struct {
    unsigned char _[64] __attribute__((aligned(sizeof(void *))));
} zmq_msg_t;
#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2

static int (*msg_init)(zmq_msg_t *);
static int (*msg_recv)(zmq_msg_t *, void *, int);
static int (*msg_close)(zmq_msg_t *);
static void *(*msg_data)(zmq_msg_t *);
static size_t (*msg_size)(const zmq_msg_t *);
static int (*msg_more)(const zmq_msg_t *);
static const char *(*msg_gets)(const zmq_msg_t *, const char *);
static int (*zsend)(void *, const void *, size_t, int);
static int (*zerrno)(void);
static const char *(*zstrerror)(int);

static PyObject *raise_zmq(const char *what) {
    int e = zerrno();
    return PyErr_Format(PyExc_OSError, "%s: %s (errno %d)", what, zstrerror(e), e);
}

static void *socket_of(PyObject *handle) {
    void *sock = PyLong_AsVoidPtr(handle);
    if (sock == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "a closed socket (its handle is 0)");
    return sock;
}

/* One frame into `msg`, retrying a signal's interruption (EINTR). */
static int recv_frame(zmq_msg_t *msg, void *sock, int flags) {
    int rc;
    do {
        rc = msg_recv(msg, sock, flags);
    } while (rc < 0 && zerrno() == EINTR && !(flags & ZMQ_DONTWAIT));
    return rc;
}

/* One frame from `buf`, retrying a signal's interruption (EINTR). */
static int send_frame(void *sock, const void *buf, size_t len, int flags) {
    int rc;
    do {
        rc = zsend(sock, buf, len, flags);
    } while (rc < 0 && zerrno() == EINTR);
    return rc;
}

PyDoc_STRVAR(receive_doc,
"receive(socket, limit) -> list[tuple[str, list[bytes]]]\n\n"
"Up to ``limit`` whole messages waiting on ``socket`` (a pyzmq Socket's\n"
"``underlying`` handle), without blocking: each as the ``User-Id`` the ZAP handler\n"
"gave its connection (\"unknown\" when none) and its frames.");

static PyObject *receive(PyObject *self, PyObject *args) {
    PyObject *handle;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "On:receive", &handle, &limit))
        return NULL;
    void *sock = socket_of(handle);
    if (sock == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    zmq_msg_t msg;
    for (Py_ssize_t n = 0; n < limit; n++) {
        msg_init(&msg);
        if (recv_frame(&msg, sock, ZMQ_DONTWAIT) < 0) {
            int e = zerrno();
            msg_close(&msg);
            if (e == EAGAIN || e == EINTR)
                break; /* nothing more now; a signal is seen by the caller's next poll */
            Py_DECREF(out);
            return raise_zmq("receive");
        }
        const char *user = msg_gets(&msg, "User-Id");
        if (user == NULL)
            user = "unknown";
        PyObject *identity = PyUnicode_DecodeUTF8(user, (Py_ssize_t)strlen(user), "replace");
        PyObject *frames = PyList_New(0);
        PyObject *item = (identity && frames) ? PyTuple_Pack(2, identity, frames) : NULL;
        Py_XDECREF(identity);
        int failed = item == NULL || PyList_Append(out, item) < 0;
        Py_XDECREF(item);
        /* the rest of a multipart message is already here: libzmq delivers it whole */
        for (;;) {
            if (!failed) {
                PyObject *frame = PyBytes_FromStringAndSize(msg_data(&msg),
                                                            (Py_ssize_t)msg_size(&msg));
                failed = frame == NULL || PyList_Append(frames, frame) < 0;
                Py_XDECREF(frame);
            }
            int more = msg_more(&msg);
            msg_close(&msg);
            if (!more)
                break;
            msg_init(&msg);
            if (recv_frame(&msg, sock, 0) < 0) {
                msg_close(&msg);
                Py_XDECREF(frames);
                Py_DECREF(out);
                return raise_zmq("receive (a later frame)");
            }
        }
        Py_XDECREF(frames);
        if (failed) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

PyDoc_STRVAR(send_doc,
"send(socket, topic, payload) -> None\n\n"
"Send ``[topic, payload]`` on ``socket`` (a pyzmq Socket's ``underlying`` handle)\n"
"without blocking: this holds the GIL, so a socket that would wait (a PAIR with no\n"
"peer, an XPUB with XPUB_NODROP at its high-water mark) raises OSError (EAGAIN)\n"
"instead. The broker's XPUB drops for a slow subscriber, so there it never does.");

static PyObject *send(PyObject *self, PyObject *args) {
    PyObject *handle;
    Py_buffer topic, payload;
    if (!PyArg_ParseTuple(args, "Oy*y*:send", &handle, &topic, &payload))
        return NULL;
    PyObject *result = NULL;
    void *sock = socket_of(handle);
    if (sock != NULL) {
        int rc = send_frame(sock, topic.buf, (size_t)topic.len, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        if (rc >= 0)
            rc = send_frame(sock, payload.buf, (size_t)payload.len, ZMQ_DONTWAIT);
        result = rc < 0 ? raise_zmq("send") : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&topic);
    PyBuffer_Release(&payload);
    return result;
}

static PyMethodDef methods[] = {
    {"receive", receive, METH_VARARGS, receive_doc},
    {"send", send, METH_VARARGS, send_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "runtime._forward",
    "The broker's socket calls in C, on pyzmq's sockets and pyzmq's libzmq.", -1, methods,
};

/* Find libzmq's functions through the pyzmq extension module that linked it. */
static int bind_libzmq(void) {
    PyObject *backend = PyImport_ImportModule("zmq.backend.cython._zmq");
    if (backend == NULL)
        return -1;
    PyObject *file = PyObject_GetAttrString(backend, "__file__");
    Py_DECREF(backend);
    const char *path = file ? PyUnicode_AsUTF8(file) : NULL;
    if (path == NULL) {
        Py_XDECREF(file);
        return -1;
    }
    void *lib = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_ImportError, "runtime._forward: cannot reach pyzmq's libzmq via %s: %s",
                     path, dlerror());
        Py_DECREF(file);
        return -1;
    }
    struct {
        const char *name;
        void **slot;
    } table[] = {
        {"zmq_msg_init", (void **)&msg_init},   {"zmq_msg_recv", (void **)&msg_recv},
        {"zmq_msg_close", (void **)&msg_close}, {"zmq_msg_data", (void **)&msg_data},
        {"zmq_msg_size", (void **)&msg_size},   {"zmq_msg_more", (void **)&msg_more},
        {"zmq_msg_gets", (void **)&msg_gets},   {"zmq_send", (void **)&zsend},
        {"zmq_errno", (void **)&zerrno},        {"zmq_strerror", (void **)&zstrerror},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        *table[i].slot = dlsym(lib, table[i].name);
        if (*table[i].slot == NULL) {
            PyErr_Format(PyExc_ImportError, "runtime._forward: %s not found beside %s",
                         table[i].name, path);
            Py_DECREF(file);
            return -1;
        }
    }
    Py_DECREF(file);
    return 0; /* `lib` stays open: pyzmq holds it for the life of the process anyway */
}

PyMODINIT_FUNC PyInit__forward(void) {
    if (bind_libzmq() < 0)
        return NULL;
    return PyModule_Create(&module);
}
