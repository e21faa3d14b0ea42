/* Batched datagram I/O for a member's data path: one syscall per burst.
 *
 * member/batch_io.py is the module the product imports; it holds the
 * pure-Python twin of every function here, which is the reference: same
 * results, same exception types, in the same order of checks (the tests
 * compare the two).  Linux only.
 *
 * Rules of this file:
 * - Never block: every socket call carries MSG_DONTWAIT; read_batch refuses
 *   an fd without O_NONBLOCK.
 * - Every argument is checked with the GIL held, before any syscall that
 *   sends: ints are ints (TypeError), out of range is ValueError; max_n and
 *   bufsize are clamped to MAX_BATCH / MAX_BUFSIZE.  Buffers are held as
 *   Py_buffer views (so nothing can resize them) while the GIL is released
 *   around the syscalls.
 * - Memory: a burst needs max_n * bufsize bytes of scratch; one scratch block
 *   (at most SCRATCH_CACHE_MAX bytes) is kept between calls, so the pages the
 *   kernel writes into are not faulted in again per burst.  A call takes the
 *   block with the GIL held, so two threads never share it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_BATCH 1024           /* UIO_MAXIOV: the kernel caps vlen there anyway */
#define MAX_BUFSIZE 65535        /* no IP packet (and no UDP payload) is larger */
#define SCRATCH_CACHE_MAX (16u << 20)
#define IPV4_HEADER 20
#define IPV6_HEADER 40

/* ---- scratch memory ------------------------------------------------------ */

static char *cached_block = NULL;
static size_t cached_size = 0;

/* A block of at least ``need`` bytes, or NULL with MemoryError.  GIL held. */
static char *scratch_take(size_t need, size_t *got) {
    if (cached_block != NULL && cached_size >= need) {
        char *p = cached_block;
        *got = cached_size;
        cached_block = NULL;
        cached_size = 0;
        return p;
    }
    char *p = malloc(need > 0 ? need : 1);
    if (p == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    *got = need;
    return p;
}

/* Keep the larger of the cached block and ``p`` (up to the cap).  GIL held. */
static void scratch_give(char *p, size_t size) {
    if (size <= SCRATCH_CACHE_MAX && (cached_block == NULL || cached_size < size)) {
        free(cached_block);
        cached_block = p;
        cached_size = size;
    } else {
        free(p);
    }
}

/* ---- argument checks ----------------------------------------------------- */

/* An int argument as long long (overflow saturates: the range checks refuse
 * or clamp it); TypeError for anything but an int. */
static int int_arg(PyObject *o, const char *name, long long *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = overflow > 0 ? LLONG_MAX : overflow < 0 ? LLONG_MIN : v;
    return 0;
}

static int fd_arg(PyObject *o, const char *name, int allow_none, int *fd) {
    long long v;
    if (int_arg(o, name, &v) < 0)
        return -1;
    if (allow_none && v == -1) {
        *fd = -1;
        return 0;
    }
    if (v < 0 || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s %lld is not a file descriptor", name, v);
        return -1;
    }
    *fd = (int)v;
    return 0;
}

/* max_n: negative is ValueError, above MAX_BATCH is clamped. */
static int count_arg(PyObject *o, long *n) {
    long long v;
    if (int_arg(o, "max_n", &v) < 0)
        return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "max_n %lld is negative", v);
        return -1;
    }
    *n = v > MAX_BATCH ? MAX_BATCH : (long)v;
    return 0;
}

/* bufsize: below ``lo`` is ValueError, above MAX_BUFSIZE is clamped. */
static int bufsize_arg(PyObject *o, long lo, long *size) {
    long long v;
    if (o == NULL) {
        *size = MAX_BUFSIZE;
        return 0;
    }
    if (int_arg(o, "bufsize", &v) < 0)
        return -1;
    if (v < lo) {
        PyErr_Format(PyExc_ValueError, "bufsize %lld is below %ld", v, lo);
        return -1;
    }
    *size = v > MAX_BUFSIZE ? MAX_BUFSIZE : (long)v;
    return 0;
}

/* A C-contiguous buffer view of ``o``, or TypeError. */
static int payload_view(PyObject *o, Py_buffer *view, const char *what, Py_ssize_t i) {
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s %zd is not a contiguous buffer (%.100s)",
                     what, i, Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *os_error(int err) {
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* Errors that say the socket itself is unusable: raised, not counted per datagram. */
static int socket_unusable(int err) {
    return err == EBADF || err == ENOTSOCK || err == EFAULT || err == EOPNOTSUPP
        || err == EDESTADDRREQ || err == ENOTCONN || err == EPIPE;
}

/* A send error that ends the burst: the queue is full. */
static int would_block(int err) {
    return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS;
}

/* ---- recv_batch ---------------------------------------------------------- */

static PyObject *bio_recv_batch(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "max_n", "bufsize", NULL};
    PyObject *fd_o, *n_o, *size_o = NULL;
    int fd;
    long n, bufsize;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:recv_batch", kwlist, &fd_o, &n_o, &size_o)
        || fd_arg(fd_o, "fd", 0, &fd) < 0 || count_arg(n_o, &n) < 0
        || bufsize_arg(size_o, 0, &bufsize) < 0)
        return NULL;
    if (n == 0)
        return Py_BuildValue("(Ni)", PyList_New(0), 0);

    size_t head = (size_t)n * (sizeof(struct mmsghdr) + sizeof(struct iovec)
                               + sizeof(struct sockaddr_storage));
    size_t got;
    char *block = scratch_take(head + (size_t)n * (size_t)bufsize, &got);
    if (block == NULL)
        return NULL;
    struct mmsghdr *msgs = (struct mmsghdr *)block;
    struct iovec *iov = (struct iovec *)(msgs + n);
    struct sockaddr_storage *names = (struct sockaddr_storage *)(iov + n);
    char *data = block + head;
    memset(msgs, 0, (size_t)n * sizeof(struct mmsghdr));
    for (long i = 0; i < n; i++) {
        iov[i].iov_base = data + (size_t)i * (size_t)bufsize;
        iov[i].iov_len = (size_t)bufsize;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
    }
    int got_n, err = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        got_n = recvmmsg(fd, msgs, (unsigned int)n, MSG_DONTWAIT, NULL);
    } while (got_n < 0 && errno == EINTR);
    if (got_n < 0)
        err = errno;
    Py_END_ALLOW_THREADS

    PyObject *items = NULL, *result = NULL;
    long truncated = 0;
    int foreign = 0;
    if (got_n < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK)
            result = Py_BuildValue("(Ni)", PyList_New(0), 0);
        else
            os_error(err);
        goto done;
    }
    items = PyList_New(0);
    if (items == NULL)
        goto done;
    for (int i = 0; i < got_n; i++) {
        const struct msghdr *h = &msgs[i].msg_hdr;
        const char *ip;
        Py_ssize_t ip_len;
        unsigned int port;
        if (h->msg_flags & MSG_TRUNC) {
            truncated++;
            continue;
        }
        if (names[i].ss_family == AF_INET && h->msg_namelen >= sizeof(struct sockaddr_in)) {
            const struct sockaddr_in *sa = (const struct sockaddr_in *)&names[i];
            ip = (const char *)&sa->sin_addr;
            ip_len = 4;
            port = ntohs(sa->sin_port);
        } else if (names[i].ss_family == AF_INET6
                   && h->msg_namelen >= sizeof(struct sockaddr_in6)) {
            const struct sockaddr_in6 *sa = (const struct sockaddr_in6 *)&names[i];
            ip = (const char *)&sa->sin6_addr;
            ip_len = 16;
            port = ntohs(sa->sin6_port);
        } else {
            foreign = 1;   /* not an AF_INET/AF_INET6 datagram socket */
            break;
        }
        size_t len = msgs[i].msg_len <= (unsigned int)bufsize ? msgs[i].msg_len : (size_t)bufsize;
        PyObject *item = Py_BuildValue("(y#y#I)", (const char *)iov[i].iov_base,
                                       (Py_ssize_t)len, ip, ip_len, port);
        if (item == NULL || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    if (foreign) {
        os_error(EAFNOSUPPORT);   /* not an AF_INET/AF_INET6 socket */
        goto done;
    }
    result = Py_BuildValue("(Ol)", items, truncated);
done:
    Py_XDECREF(items);
    scratch_give(block, got);
    return result;
}

/* ---- send_batch ---------------------------------------------------------- */

typedef struct {
    const char *ip;   /* 4 or 16 bytes, inside a bytes object the snapshot holds */
    Py_ssize_t ip_len;
    unsigned short port;
} dest_t;

static void release_views(Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

static PyObject *bio_send_batch(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "datagrams", NULL};
    PyObject *fd_o, *seq_o;
    int fd;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:send_batch", kwlist, &fd_o, &seq_o)
        || fd_arg(fd_o, "fd", 0, &fd) < 0)
        return NULL;
    PyObject *seq = PySequence_Tuple(seq_o);   /* a snapshot: stable while the GIL is out */
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq), held = 0;
    Py_buffer *views = NULL;
    dest_t *dests = NULL;
    char *block = NULL;
    size_t got = 0;
    PyObject *result = NULL;
    if (n == 0) {
        result = PyLong_FromLong(0);
        goto done;
    }
    views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    dests = PyMem_Calloc((size_t)n, sizeof(dest_t));
    if (views == NULL || dests == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_Format(PyExc_TypeError, "datagram %zd is not a (payload, ip, port) tuple", i);
            goto done;
        }
        if (payload_view(PyTuple_GET_ITEM(item, 0), &views[i], "datagram", i) < 0)
            goto done;
        held = i + 1;
        PyObject *ip = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_Check(ip)) {
            PyErr_Format(PyExc_TypeError, "datagram %zd: the ip must be bytes", i);
            goto done;
        }
        if (PyBytes_GET_SIZE(ip) != 4 && PyBytes_GET_SIZE(ip) != 16) {
            PyErr_Format(PyExc_ValueError, "datagram %zd: the ip is %zd bytes, not 4 or 16",
                         i, PyBytes_GET_SIZE(ip));
            goto done;
        }
        long long port;
        if (int_arg(PyTuple_GET_ITEM(item, 2), "port", &port) < 0)
            goto done;
        if (port < 0 || port > 65535) {
            PyErr_Format(PyExc_ValueError, "datagram %zd: port %lld out of range", i, port);
            goto done;
        }
        dests[i].ip = PyBytes_AS_STRING(ip);
        dests[i].ip_len = PyBytes_GET_SIZE(ip);
        dests[i].port = (unsigned short)port;
    }
    int family;
    socklen_t flen = sizeof(family);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &flen) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (family != AF_INET && family != AF_INET6) {
        os_error(EAFNOSUPPORT);
        goto done;
    }
    if (family == AF_INET) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (dests[i].ip_len != 4) {
                PyErr_Format(PyExc_ValueError,
                             "datagram %zd: a 16-byte ip on an AF_INET socket", i);
                goto done;
            }
        }
    }

    size_t chunk = n < MAX_BATCH ? (size_t)n : MAX_BATCH;
    block = scratch_take(chunk * (sizeof(struct mmsghdr) + sizeof(struct iovec)
                                  + sizeof(struct sockaddr_in6)), &got);
    if (block == NULL)
        goto done;
    struct mmsghdr *msgs = (struct mmsghdr *)block;
    struct iovec *iov = (struct iovec *)(msgs + chunk);
    struct sockaddr_in6 *names = (struct sockaddr_in6 *)(iov + chunk);
    Py_ssize_t sent = 0, next = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (next < n) {
        size_t m = (size_t)(n - next) < chunk ? (size_t)(n - next) : chunk;
        memset(msgs, 0, m * sizeof(struct mmsghdr));
        memset(names, 0, m * sizeof(struct sockaddr_in6));
        for (size_t j = 0; j < m; j++) {
            const dest_t *d = &dests[next + (Py_ssize_t)j];
            iov[j].iov_base = views[next + (Py_ssize_t)j].buf;
            iov[j].iov_len = (size_t)views[next + (Py_ssize_t)j].len;
            msgs[j].msg_hdr.msg_iov = &iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
            msgs[j].msg_hdr.msg_name = &names[j];
            if (family == AF_INET) {
                struct sockaddr_in *sa = (struct sockaddr_in *)&names[j];
                sa->sin_family = AF_INET;
                sa->sin_port = htons(d->port);
                memcpy(&sa->sin_addr, d->ip, 4);
                msgs[j].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
            } else {
                names[j].sin6_family = AF_INET6;
                names[j].sin6_port = htons(d->port);
                if (d->ip_len == 4) {   /* ::ffff:a.b.c.d (RFC 4291 §2.5.5.2) */
                    names[j].sin6_addr.s6_addr[10] = 0xff;
                    names[j].sin6_addr.s6_addr[11] = 0xff;
                    memcpy(&names[j].sin6_addr.s6_addr[12], d->ip, 4);
                } else {
                    memcpy(&names[j].sin6_addr, d->ip, 16);
                }
                msgs[j].msg_hdr.msg_namelen = sizeof(struct sockaddr_in6);
            }
        }
        int r = sendmmsg(fd, msgs, (unsigned int)m, MSG_DONTWAIT);
        if (r > 0) {
            sent += r;
            next += r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r == 0 || would_block(errno)) {
            break;
        } else if (socket_unusable(errno)) {
            err = errno;
            break;
        } else {
            next += 1;   /* this datagram's own error (EMSGSIZE, unreachable...): skip it */
        }
    }
    Py_END_ALLOW_THREADS
    if (err)
        os_error(err);
    else
        result = PyLong_FromSsize_t(sent);
done:
    if (block != NULL)
        scratch_give(block, got);
    if (views != NULL)
        release_views(views, held);
    PyMem_Free(views);
    PyMem_Free(dests);
    Py_DECREF(seq);
    return result;
}

/* ---- read_batch ---------------------------------------------------------- */

static PyObject *bio_read_batch(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "max_n", "bufsize", NULL};
    PyObject *fd_o, *n_o, *size_o = NULL;
    int fd;
    long n, bufsize;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:read_batch", kwlist, &fd_o, &n_o, &size_o)
        || fd_arg(fd_o, "fd", 0, &fd) < 0 || count_arg(n_o, &n) < 0
        || bufsize_arg(size_o, 1, &bufsize) < 0)
        return NULL;
    if (n == 0)
        return PyList_New(0);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (!(flags & O_NONBLOCK)) {
        PyErr_Format(PyExc_ValueError, "fd %d is in blocking mode", fd);
        return NULL;
    }
    size_t head = (size_t)n * sizeof(size_t), got;
    char *block = scratch_take(head + (size_t)n * (size_t)bufsize, &got);
    if (block == NULL)
        return NULL;
    size_t *lens = (size_t *)block;
    char *data = block + head;
    long k = 0;
    size_t off = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (k < n) {   /* each read gets bufsize bytes of room: off <= k * bufsize */
        ssize_t r = read(fd, data + off, (size_t)bufsize);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                err = errno;
            break;
        }
        if (r == 0)
            break;    /* end of file: nothing more to read */
        lens[k++] = (size_t)r;
        off += (size_t)r;
    }
    Py_END_ALLOW_THREADS
    PyObject *list = NULL;
    if (err && k == 0) {
        os_error(err);
        goto done;
    }
    list = PyList_New(k);
    if (list == NULL)
        goto done;
    off = 0;
    for (long i = 0; i < k; i++) {
        PyObject *b = PyBytes_FromStringAndSize(data + off, (Py_ssize_t)lens[i]);
        if (b == NULL) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, i, b);
        off += lens[i];
    }
done:
    scratch_give(block, got);
    return list;
}

/* ---- write_raw_batch ----------------------------------------------------- */

/* 4 or 6 if the packet can go out through that family's raw socket, else 0. */
static int raw_family(const unsigned char *p, Py_ssize_t len, int have_v6) {
    if (len >= IPV4_HEADER && p[0] >> 4 == 4) {
        Py_ssize_t ihl = (Py_ssize_t)(p[0] & 0x0f) * 4;
        return ihl >= IPV4_HEADER && ihl <= len ? 4 : 0;
    }
    if (have_v6 && len >= IPV6_HEADER && p[0] >> 4 == 6)
        return 6;
    return 0;
}

/* sendmmsg the packets of ``idx`` (``m`` of them) through ``fd``; marks the
 * ones the kernel did not take in ``unsent``.  Returns 0, or the errno that
 * makes the socket unusable.  No GIL. */
static int raw_send(int fd, int family, const Py_buffer *views, const Py_ssize_t *idx,
                    size_t m, char *unsent, struct mmsghdr *msgs, struct iovec *iov,
                    struct sockaddr_in6 *names, size_t chunk) {
    size_t next = 0;
    while (next < m) {
        size_t c = m - next < chunk ? m - next : chunk;
        memset(msgs, 0, c * sizeof(struct mmsghdr));
        memset(names, 0, c * sizeof(struct sockaddr_in6));
        for (size_t j = 0; j < c; j++) {
            const Py_buffer *v = &views[idx[next + j]];
            const unsigned char *p = v->buf;
            iov[j].iov_base = v->buf;
            iov[j].iov_len = (size_t)v->len;
            msgs[j].msg_hdr.msg_iov = &iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
            msgs[j].msg_hdr.msg_name = &names[j];
            if (family == AF_INET) {
                struct sockaddr_in *sa = (struct sockaddr_in *)&names[j];
                sa->sin_family = AF_INET;
                memcpy(&sa->sin_addr, p + 16, 4);        /* IPv4 destination */
                msgs[j].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
            } else {
                names[j].sin6_family = AF_INET6;
                memcpy(&names[j].sin6_addr, p + 24, 16); /* IPv6 destination */
                msgs[j].msg_hdr.msg_namelen = sizeof(struct sockaddr_in6);
            }
        }
        int r = sendmmsg(fd, msgs, (unsigned int)c, MSG_DONTWAIT);
        if (r > 0) {
            next += (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r == 0 || would_block(errno)) {
            for (; next < m; next++)
                unsent[idx[next]] = 1;
        } else if (socket_unusable(errno)) {
            return errno;
        } else {
            unsent[idx[next++]] = 1;   /* this packet's own error (too big, no route...) */
        }
    }
    return 0;
}

static PyObject *bio_write_raw_batch(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd4", "fd6", "packets", NULL};
    PyObject *fd4_o, *fd6_o, *seq_o;
    int fd4, fd6;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:write_raw_batch", kwlist,
                                     &fd4_o, &fd6_o, &seq_o)
        || fd_arg(fd4_o, "fd4", 0, &fd4) < 0 || fd_arg(fd6_o, "fd6", 1, &fd6) < 0)
        return NULL;
    PyObject *seq = PySequence_Tuple(seq_o);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq), held = 0, n4 = 0, n6 = 0;
    Py_buffer *views = NULL;
    Py_ssize_t *idx = NULL;
    char *unsent = NULL, *block = NULL;
    size_t got = 0;
    PyObject *result = NULL;
    if (n == 0) {
        result = PyList_New(0);
        goto done;
    }
    views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    idx = PyMem_Calloc((size_t)n, sizeof(Py_ssize_t));   /* v4 from the front, v6 from the back */
    unsent = PyMem_Calloc((size_t)n, 1);
    if (views == NULL || idx == NULL || unsent == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (payload_view(PyTuple_GET_ITEM(seq, i), &views[i], "packet", i) < 0)
            goto done;
        held = i + 1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        switch (raw_family(views[i].buf, views[i].len, fd6 >= 0)) {
        case 4: idx[n4++] = i; break;
        case 6: idx[n - 1 - n6++] = i; break;
        default: unsent[i] = 1;
        }
    }
    /* the v6 indexes were stored back to front: put them in order */
    for (Py_ssize_t a = n - n6, b = n - 1; a < b; a++, b--) {
        Py_ssize_t t = idx[a]; idx[a] = idx[b]; idx[b] = t;
    }
    size_t most = (size_t)(n4 > n6 ? n4 : n6);
    size_t chunk = most < MAX_BATCH ? most : MAX_BATCH;
    int err = 0;
    if (chunk > 0) {
        block = scratch_take(chunk * (sizeof(struct mmsghdr) + sizeof(struct iovec)
                                      + sizeof(struct sockaddr_in6)), &got);
        if (block == NULL)
            goto done;
        struct mmsghdr *msgs = (struct mmsghdr *)block;
        struct iovec *iov = (struct iovec *)(msgs + chunk);
        struct sockaddr_in6 *names = (struct sockaddr_in6 *)(iov + chunk);
        Py_BEGIN_ALLOW_THREADS
        if (n4 > 0)
            err = raw_send(fd4, AF_INET, views, idx, (size_t)n4, unsent, msgs, iov, names, chunk);
        if (err == 0 && n6 > 0)
            err = raw_send(fd6, AF_INET6, views, idx + (n - n6), (size_t)n6, unsent,
                           msgs, iov, names, chunk);
        Py_END_ALLOW_THREADS
    }
    if (err) {
        os_error(err);
        goto done;
    }
    result = PyList_New(0);
    for (Py_ssize_t i = 0; result != NULL && i < n; i++) {
        if (!unsent[i])
            continue;
        PyObject *x = PyLong_FromSsize_t(i);
        if (x == NULL || PyList_Append(result, x) < 0)
            Py_CLEAR(result);
        Py_XDECREF(x);
    }
done:
    if (block != NULL)
        scratch_give(block, got);
    if (views != NULL)
        release_views(views, held);
    PyMem_Free(views);
    PyMem_Free(idx);
    PyMem_Free(unsent);
    Py_DECREF(seq);
    return result;
}

/* ---- module -------------------------------------------------------------- */

static PyMethodDef batch_io_functions[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))bio_recv_batch, METH_VARARGS | METH_KEYWORDS,
     "recv_batch(fd, max_n, bufsize=65535) -> ([(payload, ip, port)], truncated)"},
    {"send_batch", (PyCFunction)(void (*)(void))bio_send_batch, METH_VARARGS | METH_KEYWORDS,
     "send_batch(fd, datagrams) -> how many datagrams the kernel took"},
    {"read_batch", (PyCFunction)(void (*)(void))bio_read_batch, METH_VARARGS | METH_KEYWORDS,
     "read_batch(fd, max_n, bufsize=65535) -> [packet]"},
    {"write_raw_batch", (PyCFunction)(void (*)(void))bio_write_raw_batch,
     METH_VARARGS | METH_KEYWORDS,
     "write_raw_batch(fd4, fd6, packets) -> [index of each packet not sent]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef batch_io_module = {
    PyModuleDef_HEAD_INIT, .m_name = "member._batch_io",
    .m_doc = "Compiled batched datagram I/O (see member/batch_io.py).", .m_size = -1,
    .m_methods = batch_io_functions,
};

PyMODINIT_FUNC PyInit__batch_io(void) {
    PyObject *module = PyModule_Create(&batch_io_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "MAX_BATCH", MAX_BATCH) < 0
        || PyModule_AddIntConstant(module, "MAX_BUFSIZE", MAX_BUFSIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
