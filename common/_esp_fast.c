/* The per-packet ESP byte work (RFC 4303 tunnel mode) for one SA, in C.
 *
 * Rules of this file:
 * - Bytes only.  Sequence numbers, IVs, the replay window, events and limits
 *   stay in common/esp.py; this module gets (seq, IV, inner) and gives ESP
 *   bytes, or gets ESP bytes and gives the inner packet.  common/esp.py keeps
 *   the pure-Python path as the reference; both produce identical bytes.
 * - One SaCipher per SA holds reused OpenSSL contexts (key schedule done once).
 *   Methods run with the GIL held and never release it, so a context is never
 *   used by two threads at once.
 * - Every OpenSSL return value is checked.  A failed ICV/tag is IntegrityError,
 *   a packet of impossible size MalformedMessage (both from common.errors);
 *   an OpenSSL failure that is not the peer's fault is RuntimeError.
 * - No key bytes are kept outside the OpenSSL contexts (whose free functions
 *   cleanse them); the 4-byte salt/nonce is cleansed on dealloc.  No repr, no
 *   attributes: nothing about the keys can be read back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#define HEADER_SIZE 16  /* SPI | seq | IV (RFC 4303 §2; IV 8 bytes: RFC 4106 §3.1, RFC 3686 §3.1) */
#define ICV_SIZE 16     /* GCM 16-byte tag (RFC 4106 §2), HMAC-SHA-256-128 (RFC 4868 §2.3) */
#define SALT_SIZE 4     /* RFC 4106 §8.1 salt, RFC 3686 §5.1 nonce */
#define MIN_PACKET (HEADER_SIZE + 2 + ICV_SIZE)   /* + Pad Length + Next Header */
#define MAX_PACKET (INT_MAX - 1024)                /* EVP lengths are ints */
#define NEXT_HEADER_IPV4 4
#define NEXT_HEADER_IPV6 41

static PyObject *MalformedMessage;   /* common.errors classes, set at import */
static PyObject *IntegrityError;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *cipher;  /* AES-GCM, or AES-CTR for the encrypt-then-MAC suites */
    EVP_MAC_CTX *mac;        /* HMAC-SHA-256 keyed once; NULL for GCM */
    uint32_t spi;
    int esn;
    unsigned char salt[SALT_SIZE];
} SaCipher;

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static PyObject *openssl_failed(const char *what) {
    ERR_clear_error();   /* leave nothing behind for the next OpenSSL user */
    PyErr_Format(PyExc_RuntimeError, "OpenSSL %s failed", what);
    return NULL;
}

/* Next Header for an inner packet (RFC 4303 §2.6): 4 or 41 by version nibble. */
static int next_header_of(unsigned char first) {
    switch (first >> 4) {
    case 4: return NEXT_HEADER_IPV4;
    case 6: return NEXT_HEADER_IPV6;
    default: return -1;
    }
}

/* ---- construction ------------------------------------------------------- */

static int SaCipher_init(SaCipher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "salt", "integ_key", "spi", "esn", NULL};
    Py_buffer key, salt, integ;
    unsigned long spi;
    int esn, ok = -1;
    const char *name;
    if (self->cipher != NULL) {
        PyErr_SetString(PyExc_TypeError, "SaCipher is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*y*kp", kwlist,
                                     &key, &salt, &integ, &spi, &esn))
        return -1;
    if ((key.len != 16 && key.len != 32) || salt.len != SALT_SIZE
            || (integ.len != 0 && integ.len != 32) || spi > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError,
                        "SaCipher needs a 16/32-byte key, 4-byte salt, 0/32-byte integ_key "
                        "and a 32-bit spi");
        goto done;
    }
    self->spi = (uint32_t)spi;
    self->esn = esn;
    memcpy(self->salt, salt.buf, SALT_SIZE);
    if (integ.len == 0)
        name = key.len == 16 ? "AES-128-GCM" : "AES-256-GCM";
    else
        name = key.len == 16 ? "AES-128-CTR" : "AES-256-CTR";
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, name, NULL);
    self->cipher = EVP_CIPHER_CTX_new();
    /* The key schedule is done here, once; per packet only the IV is set. */
    int cipher_ok = cipher != NULL && self->cipher != NULL
        && EVP_EncryptInit_ex2(self->cipher, cipher, key.buf, NULL, NULL) == 1;
    EVP_CIPHER_free(cipher);
    if (!cipher_ok) {
        openssl_failed("cipher setup");
        goto done;
    }
    if (integ.len != 0) {
        /* RFC 4868 §2.1: HMAC-SHA-256 with a 32-byte key; the keyed state is
         * reused and reset per packet (EVP_MAC_init with a NULL key). */
        EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
        OSSL_PARAM params[] = {
            OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0),
            OSSL_PARAM_construct_end(),
        };
        self->mac = mac != NULL ? EVP_MAC_CTX_new(mac) : NULL;
        EVP_MAC_free(mac);
        if (self->mac == NULL || EVP_MAC_init(self->mac, integ.buf, (size_t)integ.len,
                                              params) != 1) {
            openssl_failed("HMAC setup");
            goto done;
        }
    }
    ok = 0;
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&integ);
    return ok;
}

static void SaCipher_dealloc(SaCipher *self) {
    EVP_CIPHER_CTX_free(self->cipher);   /* cleanses the key schedule */
    EVP_MAC_CTX_free(self->mac);         /* cleanses the HMAC key states */
    OPENSSL_cleanse(self->salt, sizeof self->salt);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(SaCipher *self) {
    if (self->cipher != NULL)
        return 1;
    PyErr_SetString(PyExc_TypeError, "SaCipher was not initialised");
    return 0;
}

/* ---- the two transforms, one direction each ----------------------------- */

/* The 16-byte IV block: GCM nonce salt | IV (RFC 4106 §4), or the CTR counter
 * block nonce | IV | 1 (RFC 3686 §4); GCM uses the first 12 bytes. */
static void iv_block(const SaCipher *self, const unsigned char *iv8, unsigned char out[16]) {
    memcpy(out, self->salt, SALT_SIZE);
    memcpy(out + SALT_SIZE, iv8, 8);
    put32(out + 12, 1);
}

/* RFC 4106 §5: AAD is SPI | seq (8 bytes), or SPI | seq high | seq low with ESN. */
static int gcm_aad(SaCipher *self, const unsigned char *header, uint32_t seq_high) {
    unsigned char aad[12];
    int n = 8, outl;
    memcpy(aad, header, 4);
    if (self->esn) {
        put32(aad + 4, seq_high);
        memcpy(aad + 8, header + 4, 4);
        n = 12;
    } else {
        memcpy(aad + 4, header + 4, 4);
    }
    return EVP_CipherUpdate(self->cipher, NULL, &outl, aad, n) == 1;
}

/* HMAC-SHA-256-128 over data, then with ESN the unsent high half of the
 * sequence number (RFC 4303 §2.2.1, §3.3.2.1); the first 16 bytes go to icv. */
static int hmac_icv(SaCipher *self, const unsigned char *data, size_t n, uint32_t seq_high,
                    unsigned char icv[ICV_SIZE]) {
    unsigned char full[32], high[4];
    size_t outl = 0;
    put32(high, seq_high);
    int ok = EVP_MAC_init(self->mac, NULL, 0, NULL) == 1
        && EVP_MAC_update(self->mac, data, n) == 1
        && (!self->esn || EVP_MAC_update(self->mac, high, 4) == 1)
        && EVP_MAC_final(self->mac, full, &outl, sizeof full) == 1 && outl == sizeof full;
    memcpy(icv, full, ICV_SIZE);
    OPENSSL_cleanse(full, sizeof full);
    return ok;
}

/* ---- protect ------------------------------------------------------------ */

static PyObject *SaCipher_seal(SaCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self))
        return NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "seal(seq, iv, inner) takes 3 arguments");
        return NULL;
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[0]);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long iv = PyLong_AsUnsignedLongLong(args[1]);
    if (iv == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer in;
    if (PyObject_GetBuffer(args[2], &in, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    const unsigned char *inner = in.buf;
    int nh = in.len > 0 ? next_header_of(inner[0]) : -1;
    if (in.len == 0) {
        PyErr_SetString(MalformedMessage, "inner packet is empty");
        goto done;
    }
    if (nh < 0) {
        PyErr_Format(MalformedMessage, "inner packet is not IPv4/IPv6 (version %d)",
                     inner[0] >> 4);
        goto done;
    }
    if (in.len > MAX_PACKET) {
        PyErr_SetString(MalformedMessage, "inner packet too large");
        goto done;
    }
    /* RFC 4303 §2.4: padding 1, 2, 3, ... so that Pad Length and Next Header
     * end on a 4-byte boundary (block size 1 for GCM and CTR). */
    int n = (int)in.len, pad = (4 - (n + 2) % 4) % 4, payload = n + pad + 2;
    unsigned char trailer[5] = {1, 2, 3, 0, 0};
    trailer[pad] = (unsigned char)pad;
    trailer[pad + 1] = (unsigned char)nh;
    result = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + payload + ICV_SIZE);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    unsigned char block[16], *ct = out + HEADER_SIZE, *icv = ct + payload;
    put32(out, self->spi);                       /* RFC 4303 §2.1, §2.2: low 32 bits sent */
    put32(out + 4, (uint32_t)seq);
    put32(out + 8, (uint32_t)(iv >> 32));
    put32(out + 12, (uint32_t)iv);
    iv_block(self, out + 8, block);
    uint32_t seq_high = (uint32_t)(seq >> 32);
    int l1, l2, l3;
    int ok = EVP_EncryptInit_ex2(self->cipher, NULL, NULL, block, NULL) == 1
        && (self->mac != NULL || gcm_aad(self, out, seq_high))
        && EVP_EncryptUpdate(self->cipher, ct, &l1, inner, n) == 1
        && EVP_EncryptUpdate(self->cipher, ct + l1, &l2, trailer, pad + 2) == 1
        && EVP_EncryptFinal_ex(self->cipher, ct + l1 + l2, &l3) == 1
        && l1 + l2 + l3 == payload;
    if (ok && self->mac == NULL)                  /* RFC 4106 §2: the GCM tag is the ICV */
        ok = EVP_CIPHER_CTX_ctrl(self->cipher, EVP_CTRL_GCM_GET_TAG, ICV_SIZE, icv) == 1;
    else if (ok)                                  /* RFC 4303 §3.3.4: encrypt, then MAC */
        ok = hmac_icv(self, out, HEADER_SIZE + (size_t)payload, seq_high, icv);
    if (!ok) {
        Py_CLEAR(result);
        openssl_failed("encryption");
    }
done:
    PyBuffer_Release(&in);
    return result;
}

/* ---- unprotect ---------------------------------------------------------- */

static int check_size(Py_ssize_t n) {
    if (n < MIN_PACKET) {
        PyErr_Format(MalformedMessage, "ESP packet too short: %zd bytes, need at least %d",
                     n, MIN_PACKET);
        return 0;
    }
    if (n > MAX_PACKET) {
        PyErr_SetString(MalformedMessage, "ESP packet too large");
        return 0;
    }
    return 1;
}

/* peek(packet) -> seq_low: the size and SPI checks before the replay check. */
static PyObject *SaCipher_peek(SaCipher *self, PyObject *arg) {
    Py_buffer in;
    if (!ready(self) || PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    if (check_size(in.len)) {
        uint32_t spi = get32(in.buf);
        if (spi != self->spi)
            PyErr_Format(MalformedMessage, "ESP packet for SPI 0x%08lx reached SA 0x%08lx",
                         (unsigned long)spi, (unsigned long)self->spi);
        else
            result = PyLong_FromUnsignedLong(get32((unsigned char *)in.buf + 4));
    }
    PyBuffer_Release(&in);
    return result;
}

/* RFC 4303 §2.4-2.6: padding 1, 2, 3, ..., Pad Length, then Next Header
 * matching the inner packet's IP version.  Returns the inner length or -1. */
static Py_ssize_t inner_length(const unsigned char *plain, Py_ssize_t n) {
    int pad = plain[n - 2];
    Py_ssize_t end = n - 2 - pad;
    if (end < 1 || plain[n - 1] != next_header_of(plain[0]))
        return -1;
    for (int i = 0; i < pad; i++)
        if (plain[end + i] != i + 1)
            return -1;
    return end;
}

/* open(packet, seq_high) -> inner | None: authenticate, decrypt, check the
 * trailer.  IntegrityError when the ICV fails; None when the packet is
 * authentic but its trailer is not (the caller records it, then refuses it). */
static PyObject *SaCipher_open(SaCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open(packet, seq_high) takes 2 arguments");
        return NULL;
    }
    unsigned long seq_high = PyLong_AsUnsignedLong(args[1]);
    if (seq_high == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (seq_high > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "seq_high is 32 bits");
        return NULL;
    }
    Py_buffer in;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    if (!check_size(in.len))
        goto done;
    const unsigned char *packet = in.buf;
    int ctlen = (int)in.len - HEADER_SIZE - ICV_SIZE, l1, l2;
    unsigned char block[16], tag[ICV_SIZE];
    memcpy(tag, packet + in.len - ICV_SIZE, ICV_SIZE);
    if (self->mac != NULL) {
        /* RFC 4303 §3.4.4: verify the ICV before decrypting; constant time. */
        unsigned char icv[ICV_SIZE];
        if (!hmac_icv(self, packet, (size_t)in.len - ICV_SIZE, (uint32_t)seq_high, icv)) {
            openssl_failed("HMAC");
            goto done;
        }
        if (CRYPTO_memcmp(icv, tag, ICV_SIZE) != 0) {
            PyErr_SetString(IntegrityError, "ESP ICV check failed");
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(NULL, ctlen);
    if (result == NULL)
        goto done;
    unsigned char *plain = (unsigned char *)PyBytes_AS_STRING(result);
    iv_block(self, packet + 8, block);
    int ok = EVP_DecryptInit_ex2(self->cipher, NULL, NULL, block, NULL) == 1
        && (self->mac != NULL || gcm_aad(self, packet, (uint32_t)seq_high))
        && EVP_DecryptUpdate(self->cipher, plain, &l1, packet + HEADER_SIZE, ctlen) == 1
        && (self->mac != NULL
            || EVP_CIPHER_CTX_ctrl(self->cipher, EVP_CTRL_GCM_SET_TAG, ICV_SIZE, tag) == 1);
    if (!ok) {
        Py_CLEAR(result);
        openssl_failed("decryption");
        goto done;
    }
    /* For GCM the tag is checked here (EVP compares it in constant time). */
    if (EVP_DecryptFinal_ex(self->cipher, plain + l1, &l2) != 1 || l1 + l2 != ctlen) {
        ERR_clear_error();
        OPENSSL_cleanse(plain, (size_t)ctlen);   /* unauthenticated plaintext */
        Py_CLEAR(result);
        if (self->mac == NULL)
            PyErr_Format(IntegrityError, "ESP ICV check failed (SPI 0x%08lx)",
                         (unsigned long)self->spi);
        else
            openssl_failed("decryption");
        goto done;
    }
    Py_ssize_t end = inner_length(plain, ctlen);
    if (end < 0) {
        Py_CLEAR(result);
        result = Py_NewRef(Py_None);
    } else if (_PyBytes_Resize(&result, end) < 0) {   /* shrinks in place */
        result = NULL;
    }
done:
    PyBuffer_Release(&in);
    return result;
}

/* ---- type and module ---------------------------------------------------- */

static PyMethodDef SaCipher_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))SaCipher_seal, METH_FASTCALL,
     "seal(seq, iv, inner) -> SPI | seq | IV | ciphertext | ICV"},
    {"peek", (PyCFunction)SaCipher_peek, METH_O,
     "peek(packet) -> the 32-bit sequence number, after the size and SPI checks"},
    {"open", (PyCFunction)(void (*)(void))SaCipher_open, METH_FASTCALL,
     "open(packet, seq_high) -> the inner packet, or None if authentic but malformed"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SaCipherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "common._esp_fast.SaCipher",
    .tp_doc = "ESP byte primitive for one SA: reused OpenSSL contexts, no state but keys.",
    .tp_basicsize = sizeof(SaCipher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SaCipher_init,
    .tp_dealloc = (destructor)SaCipher_dealloc,
    .tp_methods = SaCipher_methods,
};

/* -- RFC 4301 §5.2 selector checks on inner packets ------------------------------
 *
 * The compiled twin of common/selectors.py (``five_tuple``, ``packet_matches``),
 * which stays the reference: same fields, same MalformedMessage cases, the
 * tests compare the two.  A compiled side is a bytes object of SEL_SIZE
 * records (common.selectors.compile_blob, struct "=BBxxii16s16s"): version,
 * protocol (0 = any), first port, last port (first -1 = any, OPAQUE too), first
 * and last address big-endian (IPv4 in the first 4 bytes). */

#define SEL_SIZE 44
#define NO_PORTS (-1)
#define MAX_IPV6_EXT 8

typedef struct {
    int version, proto;
    long sport, dport;
    const unsigned char *src, *dst;
} five_t;

static int has_ports(int proto) {
    return proto == 6 || proto == 17 || proto == 33 || proto == 132 || proto == 136;
}

/* 0, or -1 with MalformedMessage set. */
static int l4_ports(const unsigned char *p, Py_ssize_t n, Py_ssize_t off, five_t *t) {
    if (has_ports(t->proto)) {
        if (n < off + 4) {
            PyErr_Format(MalformedMessage, "protocol %d header too short for its ports", t->proto);
            return -1;
        }
        t->sport = (p[off] << 8) | p[off + 1];
        t->dport = (p[off + 2] << 8) | p[off + 3];
    } else if (t->proto == 1 || t->proto == 58) {   /* type << 8 | code, RFC 4301 §4.4.1.3 */
        if (n < off + 2) {
            PyErr_SetString(MalformedMessage, "ICMP header too short for type and code");
            return -1;
        }
        t->sport = t->dport = (p[off] << 8) | p[off + 1];
    } else {
        t->sport = t->dport = NO_PORTS;
    }
    return 0;
}

static int parse_v6(const unsigned char *p, Py_ssize_t n, five_t *t) {
    if (n < 40) {
        PyErr_Format(MalformedMessage, "IPv6 packet of %zd bytes", n);
        return -1;
    }
    t->version = 6;
    t->src = p + 8;
    t->dst = p + 24;
    int nh = p[6], walked = 0;
    Py_ssize_t off = 40;
    for (int i = 0; i < MAX_IPV6_EXT && !walked; i++) {
        if (nh == 0 || nh == 43 || nh == 60) {   /* RFC 8200 §4 */
            if (n < off + 2)
                goto past_end;
            nh = p[off];
            off += ((Py_ssize_t)p[off + 1] + 1) * 8;
        } else if (nh == 44) {                   /* RFC 8200 §4.5 */
            if (n < off + 8)
                goto past_end;
            int offset = ((p[off + 2] << 8) | p[off + 3]) & 0xFFF8;
            nh = p[off];
            off += 8;
            if (offset) {                        /* RFC 4301 §7: no ports */
                t->proto = nh;
                t->sport = t->dport = NO_PORTS;
                return 0;
            }
        } else {
            walked = 1;
        }
    }
    if (!walked) {
        PyErr_Format(MalformedMessage, "more than %d IPv6 extension headers", MAX_IPV6_EXT);
        return -1;
    }
    if (off > n)
        goto past_end;
    t->proto = nh;
    return l4_ports(p, n, off, t);
past_end:
    PyErr_SetString(MalformedMessage, "IPv6 extension header past the end");
    return -1;
}

static int parse_inner(const unsigned char *p, Py_ssize_t n, five_t *t) {
    if (n == 0) {
        PyErr_SetString(MalformedMessage, "empty inner packet");
        return -1;
    }
    int version = p[0] >> 4;
    if (version == 4) {
        Py_ssize_t ihl = (Py_ssize_t)(p[0] & 0x0F) * 4;
        if (ihl < 20 || n < ihl) {
            PyErr_Format(MalformedMessage, "IPv4 header of %zd bytes in a %zd-byte packet",
                         ihl, n);
            return -1;
        }
        t->version = 4;
        t->proto = p[9];
        t->src = p + 12;
        t->dst = p + 16;
        if (((p[6] << 8) | p[7]) & 0x1FFF) {
            t->sport = t->dport = NO_PORTS;
            return 0;
        }
        return l4_ports(p, n, ihl, t);
    }
    if (version == 6)
        return parse_v6(p, n, t);
    PyErr_Format(MalformedMessage, "inner packet of IP version %d", version);
    return -1;
}

static int side_matches(const unsigned char *sels, Py_ssize_t len, const five_t *t,
                        const unsigned char *addr, long port) {
    size_t alen = t->version == 4 ? 4 : 16;
    for (Py_ssize_t i = 0; i + SEL_SIZE <= len; i += SEL_SIZE) {
        const unsigned char *s = sels + i;
        int32_t plo, phi;
        memcpy(&plo, s + 4, 4);
        memcpy(&phi, s + 8, 4);
        if (s[0] == t->version && (s[1] == 0 || s[1] == t->proto) && plo <= port
                && port <= phi && memcmp(addr, s + 12, alen) >= 0
                && memcmp(addr, s + 28, alen) <= 0)
            return 1;
    }
    return 0;
}

static PyObject *esp_fast_match_selectors(PyObject *self, PyObject *const *args,
                                          Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "match_selectors(src_blob, dst_blob, packet)");
        return NULL;
    }
    Py_buffer src, dst, pkt;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &dst, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &pkt, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    five_t t;
    PyObject *result = NULL;
    if (parse_inner(pkt.buf, pkt.len, &t) == 0) {
        int ok = side_matches(src.buf, src.len, &t, t.src, t.sport)
                 && side_matches(dst.buf, dst.len, &t, t.dst, t.dport);
        result = Py_NewRef(ok ? Py_True : Py_False);
    }
    PyBuffer_Release(&pkt);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

static PyObject *address_int(const unsigned char *a, int version) {
    if (version == 4)
        return PyLong_FromUnsignedLong(((unsigned long)a[0] << 24) | ((unsigned long)a[1] << 16)
                                       | ((unsigned long)a[2] << 8) | a[3]);
    return _PyLong_FromByteArray(a, 16, 0, 0);
}

static PyObject *esp_fast_five_tuple(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer pkt;
    if (PyObject_GetBuffer(arg, &pkt, PyBUF_SIMPLE) < 0)
        return NULL;
    five_t t;
    PyObject *result = NULL;
    if (parse_inner(pkt.buf, pkt.len, &t) == 0 && (result = PyTuple_New(6)) != NULL) {
        PyObject *items[6] = {PyLong_FromLong(t.version), address_int(t.src, t.version),
                              address_int(t.dst, t.version), PyLong_FromLong(t.proto),
                              PyLong_FromLong(t.sport), PyLong_FromLong(t.dport)};
        for (int i = 0; i < 6; i++) {
            if (items[i] == NULL) {
                Py_CLEAR(result);
                for (int j = 0; j < 6; j++)
                    Py_XDECREF(items[j]);
                break;
            }
        }
        for (int i = 0; result != NULL && i < 6; i++)
            PyTuple_SET_ITEM(result, i, items[i]);   /* steals the reference */
    }
    PyBuffer_Release(&pkt);
    return result;
}

static PyMethodDef esp_fast_functions[] = {
    {"match_selectors", (PyCFunction)(void (*)(void))esp_fast_match_selectors, METH_FASTCALL,
     "match_selectors(src_blob, dst_blob, packet) -> bool (common.selectors.packet_matches)"},
    {"five_tuple", (PyCFunction)esp_fast_five_tuple, METH_O,
     "five_tuple(packet) -> (version, src, dst, protocol, sport, dport)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef esp_fast_module = {
    PyModuleDef_HEAD_INIT, .m_name = "common._esp_fast",
    .m_doc = "Compiled ESP byte primitive (see common/esp.py).", .m_size = -1,
    .m_methods = esp_fast_functions,
};

PyMODINIT_FUNC PyInit__esp_fast(void) {
    PyObject *errors = PyImport_ImportModule("common.errors");
    if (errors == NULL)
        return NULL;
    MalformedMessage = PyObject_GetAttrString(errors, "MalformedMessage");
    IntegrityError = PyObject_GetAttrString(errors, "IntegrityError");
    Py_DECREF(errors);
    if (MalformedMessage == NULL || IntegrityError == NULL || PyType_Ready(&SaCipherType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&esp_fast_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "SaCipher", (PyObject *)&SaCipherType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
