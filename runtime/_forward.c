/* The broker's hot path in C: take whole messages off one socket and forward the
 * ones known to be good to another, on the sockets pyzmq made (runtime/broker.py).
 *
 * Measured in benchmarks/bus.py at 10k msg/s: the all-Python loop spent about 21 us of
 * interpreter time per message (pyzmq's wrappers and the glue around the checks), and
 * every microsecond the broker holds a CPU on a 2-core machine shows in its p99. So the loop over a
 * batch is here: a message whose checks are already known to pass (the envelope
 * decodes with msgspec, its topic and sender match, and the broker's cached ACL
 * verdict for its identity, topic and body type is "allowed") is forwarded here;
 * every other message goes to the broker's Python code, which is the one that
 * decides, reports and fills the cache. Nothing Python would refuse is forwarded here.
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
#define TOPIC_MAX 200 /* longer topics take Python's path, which reports them cut short */

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

/* Take one whole message off `sock` without blocking: 1 with `*identity` (the User-Id
 * the ZAP handler gave its connection, "unknown" when none) and `*frames` (a list of
 * bytes) set, 0 when nothing is waiting, -1 with a Python error set. */
static int take(void *sock, PyObject **identity, PyObject **frames) {
    zmq_msg_t msg;
    msg_init(&msg);
    if (recv_frame(&msg, sock, ZMQ_DONTWAIT) < 0) {
        int e = zerrno();
        msg_close(&msg);
        if (e == EAGAIN || e == EINTR)
            return 0; /* nothing more now; a signal is seen by the caller's next poll */
        raise_zmq("receive");
        return -1;
    }
    const char *user = msg_gets(&msg, "User-Id");
    if (user == NULL)
        user = "unknown";
    *identity = PyUnicode_DecodeUTF8(user, (Py_ssize_t)strlen(user), "replace");
    *frames = PyList_New(0);
    int failed = *identity == NULL || *frames == NULL;
    /* the rest of a multipart message is already here: libzmq delivers it whole, and
     * it is read to the end even after a failure, so the next message starts clean */
    for (;;) {
        if (!failed) {
            PyObject *frame = PyBytes_FromStringAndSize(msg_data(&msg),
                                                        (Py_ssize_t)msg_size(&msg));
            failed = frame == NULL || PyList_Append(*frames, frame) < 0;
            Py_XDECREF(frame);
        }
        int more = msg_more(&msg);
        msg_close(&msg);
        if (!more)
            break;
        msg_init(&msg);
        if (recv_frame(&msg, sock, 0) < 0) {
            msg_close(&msg);
            if (!failed)
                raise_zmq("receive (a later frame)");
            failed = 1;
            break;
        }
    }
    if (failed) {
        Py_CLEAR(*identity);
        Py_CLEAR(*frames);
        return -1;
    }
    return 1;
}

/* Send [topic, payload] as two frames, retrying a signal's interruption. Never
 * blocks (this holds the GIL): a sink that would (a PAIR with no peer, an XPUB with
 * XPUB_NODROP at its high-water mark) fails with EAGAIN. The broker's XPUB drops for
 * a slow subscriber instead, so there it never does. */
static int send_pair(void *sock, const void *topic, size_t topic_len, const void *payload,
                     size_t payload_len) {
    int rc;
    do {
        rc = zsend(sock, topic, topic_len, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    } while (rc < 0 && zerrno() == EINTR);
    if (rc >= 0) {
        do {
            rc = zsend(sock, payload, payload_len, ZMQ_DONTWAIT);
        } while (rc < 0 && zerrno() == EINTR);
    }
    return rc;
}

/* Whether the broker's checks are already known to pass for this message: two
 * frames, within the size limit, a payload that decodes, the envelope's topic and
 * sender equal to the frame's and the identity's, and (identity, topic, body type)
 * cached as allowed (None) in `verdicts`. 1 yes, 0 no (Python decides), -1 error. */
static int known_good(PyObject *identity, PyObject *frames, PyObject *decode,
                      PyObject *verdicts, Py_ssize_t max_bytes) {
    if (PyList_GET_SIZE(frames) != 2)
        return 0;
    PyObject *topic = PyList_GET_ITEM(frames, 0), *payload = PyList_GET_ITEM(frames, 1);
    if (PyBytes_GET_SIZE(payload) > max_bytes || PyBytes_GET_SIZE(topic) > TOPIC_MAX)
        return 0;
    PyObject *envelope = PyObject_CallOneArg(decode, payload);
    if (envelope == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1; /* not a decoding problem (KeyboardInterrupt, say): let it out */
        PyErr_Clear();
        return 0; /* Python decodes it again and says why */
    }
    int good = 0;
    PyObject *env_topic = PyObject_GetAttrString(envelope, "topic");
    PyObject *sender = PyObject_GetAttrString(envelope, "sender");
    PyObject *body = PyObject_GetAttrString(envelope, "body");
    if (env_topic == NULL || sender == NULL || body == NULL) {
        PyErr_Clear();
        goto done;
    }
    Py_ssize_t len;
    const char *text = PyUnicode_Check(env_topic) ? PyUnicode_AsUTF8AndSize(env_topic, &len)
                                                  : NULL;
    if (text == NULL) {
        PyErr_Clear();
        goto done;
    }
    if (len != PyBytes_GET_SIZE(topic) || memcmp(text, PyBytes_AS_STRING(topic), len) != 0)
        goto done;
    int same = PyObject_RichCompareBool(sender, identity, Py_EQ);
    if (same <= 0) {
        PyErr_Clear();
        goto done;
    }
    PyObject *key = PyTuple_Pack(3, identity, env_topic, (PyObject *)Py_TYPE(body));
    if (key == NULL) {
        good = -1;
        goto done;
    }
    PyObject *verdict = PyDict_GetItemWithError(verdicts, key); /* borrowed */
    Py_DECREF(key);
    if (verdict == NULL && PyErr_Occurred())
        PyErr_Clear();
    good = verdict == Py_None;
done:
    Py_XDECREF(env_topic);
    Py_XDECREF(sender);
    Py_XDECREF(body);
    Py_DECREF(envelope);
    return good;
}

PyDoc_STRVAR(forward_doc,
"forward(source, sink, limit, decode, verdicts, log, max_bytes, other) -> int\n\n"
"The broker's loop for up to ``limit`` whole messages waiting on ``source``, without\n"
"blocking. A message whose checks are known to pass (two frames, at most\n"
"``max_bytes``, ``decode(payload)`` succeeds, its envelope's topic and sender are the\n"
"frame's and the connection's identity, and the broker's cached\n"
"``verdicts[(identity, topic, type(body))]`` is None, allowed) is sent on ``sink`` and its payload appended to ``log``;\n"
"any other goes to ``other(identity, frames)``, which decides. Returns how many were\n"
"sent here. ``source``/``sink``: pyzmq Sockets' ``underlying`` handles.");

static PyObject *forward(PyObject *self, PyObject *args) {
    PyObject *source_handle, *sink_handle, *decode, *verdicts, *log, *other;
    Py_ssize_t limit, max_bytes;
    if (!PyArg_ParseTuple(args, "OOnOO!O!nO:forward", &source_handle, &sink_handle, &limit,
                          &decode, &PyDict_Type, &verdicts, &PyList_Type, &log, &max_bytes,
                          &other))
        return NULL;
    void *source = socket_of(source_handle), *sink = NULL;
    if (source == NULL || (sink = socket_of(sink_handle)) == NULL)
        return NULL;
    Py_ssize_t sent = 0;
    for (Py_ssize_t n = 0; n < limit; n++) {
        PyObject *identity, *frames;
        int got = take(source, &identity, &frames);
        if (got <= 0) {
            if (got < 0)
                return NULL;
            break;
        }
        int good = known_good(identity, frames, decode, verdicts, max_bytes);
        int failed = good < 0;
        if (good > 0) {
            PyObject *topic = PyList_GET_ITEM(frames, 0), *payload = PyList_GET_ITEM(frames, 1);
            if (send_pair(sink, PyBytes_AS_STRING(topic), (size_t)PyBytes_GET_SIZE(topic),
                          PyBytes_AS_STRING(payload), (size_t)PyBytes_GET_SIZE(payload)) < 0) {
                raise_zmq("send");
                failed = 1;
            } else {
                sent++;
                failed = PyList_Append(log, payload) < 0;
            }
        } else if (good == 0) {
            PyObject *result = PyObject_CallFunctionObjArgs(other, identity, frames, NULL);
            failed = result == NULL;
            Py_XDECREF(result);
        }
        Py_DECREF(identity);
        Py_DECREF(frames);
        if (failed)
            return NULL;
    }
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS, forward_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "runtime._forward",
    "The broker's forwarding loop in C, on pyzmq's sockets and pyzmq's libzmq.", -1, methods,
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
