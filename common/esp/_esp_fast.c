/* The per-packet ESP byte work (RFC 4303 tunnel mode) for one SA, in C.
 *
 * Rules of this file:
 * - Bytes only.  Sequence numbers, IVs, the replay window, events and limits
 *   stay in common/esp/transforms.py; this module gets (seq, IV, inner) and gives ESP
 *   bytes, or gets ESP bytes and gives the inner packet.  common/esp/transforms.py keeps
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

#define SPI_SEQ_SIZE 8  /* SPI | seq (RFC 4303 §2) */
#define IV_SIZE 8       /* RFC 4106 §3.1, RFC 3686 §3.1, RFC 7634 §2 */
#define CBC_IV_SIZE 16  /* RFC 3602 §3 */
#define BLOCK 16        /* AES block */
#define AEAD_TAG_SIZE 16 /* GCM (RFC 4106 §2) and Poly1305 (RFC 7634 §2) tags */
#define MAX_ICV 32      /* HMAC-SHA-512-256 (RFC 4868 §2.1) */
#define SALT_SIZE 4     /* RFC 4106 §8.1 salt, RFC 3686 §5.1 nonce, RFC 7634 §4 salt */
#define MAX_PACKET (INT_MAX - 1024)                /* EVP lengths are ints */
/* The CBC IV is E_K(prefix | sender_id | counter): SP 800-38A Appendix C
 * (see common/esp/transforms.py CbcHmac, which this must match byte for byte). */
static const unsigned char CBC_IV_PREFIX[8] = {'E', 'S', 'P', '-', 'C', 'B', 'C', 0};

enum kind { GCM, CHACHA, CTR, CBC };
#define NEXT_HEADER_IPV4 4
#define NEXT_HEADER_IPV6 41

static PyObject *MalformedMessage;   /* common.errors classes, set at import */
static PyObject *IntegrityError;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *cipher;  /* AES-GCM, ChaCha20-Poly1305, AES-CTR or AES-CBC */
    EVP_CIPHER_CTX *decipher; /* CBC: its own context (AES decrypts with another key
                              * schedule); else the same pointer as cipher */
    EVP_CIPHER_CTX *ivgen;   /* CBC only: AES-ECB under the same key, for the IV */
    EVP_MAC_CTX *mac;        /* HMAC keyed once; NULL for the AEADs */
    enum kind kind;
    uint32_t spi;
    int esn;
    int iv_size;             /* 8, or 16 for CBC */
    int align;               /* RFC 4303 §2.4: 4, or the 16-byte block for CBC */
    int icv_size;            /* 16 for the AEADs, else the truncated HMAC */
    int min_packet;          /* header, IV, Pad Length + Next Header (CBC: a block), ICV */
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

/* RFC 2404 §2, RFC 4868 §2.1: HMAC hash -> key and truncated ICV bytes. */
static const struct { const char *name, *digest; int key, icv; } HMACS[] = {
    {"sha1", "SHA1", 20, 12}, {"sha256", "SHA256", 32, 16},
    {"sha384", "SHA384", 48, 24}, {"sha512", "SHA512", 64, 32},
};

static EVP_CIPHER_CTX *cipher_ctx(const char *name, const unsigned char *key, int enc) {
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, name, NULL);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    /* The key schedule is done here, once; per packet only the IV is set. */
    int ok = cipher != NULL && ctx != NULL
        && EVP_CipherInit_ex2(ctx, cipher, key, NULL, enc, NULL) == 1
        && EVP_CIPHER_CTX_set_padding(ctx, 0) == 1;
    EVP_CIPHER_free(cipher);
    if (!ok) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static int SaCipher_init(SaCipher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cipher", "key", "salt", "integ_key", "digest", "spi", "esn", NULL};
    Py_buffer key, salt, integ;
    const char *kind, *digest;
    unsigned long spi;
    int esn, ok = -1, hmac = -1;
    if (self->cipher != NULL) {
        PyErr_SetString(PyExc_TypeError, "SaCipher is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sy*y*y*skp", kwlist, &kind,
                                     &key, &salt, &integ, &digest, &spi, &esn))
        return -1;
    for (int i = 0; i < (int)(sizeof HMACS / sizeof HMACS[0]); i++)
        if (strcmp(digest, HMACS[i].name) == 0)
            hmac = i;
    const char *name = NULL;
    if (strcmp(kind, "gcm") == 0 && *digest == 0 && salt.len == SALT_SIZE) {
        self->kind = GCM;
        name = key.len == 16 ? "AES-128-GCM" : key.len == 32 ? "AES-256-GCM" : NULL;
    } else if (strcmp(kind, "chacha20poly1305") == 0 && *digest == 0
               && salt.len == SALT_SIZE) {
        self->kind = CHACHA;
        name = key.len == 32 ? "ChaCha20-Poly1305" : NULL;
    } else if (strcmp(kind, "ctr") == 0 && hmac >= 0 && salt.len == SALT_SIZE) {
        self->kind = CTR;
        name = key.len == 16 ? "AES-128-CTR" : key.len == 32 ? "AES-256-CTR" : NULL;
    } else if (strcmp(kind, "cbc") == 0 && hmac >= 0 && salt.len == 0) {
        self->kind = CBC;
        name = key.len == 16 ? "AES-128-CBC" : key.len == 32 ? "AES-256-CBC" : NULL;
    }
    if (name == NULL || spi > 0xFFFFFFFFUL || (hmac >= 0 && integ.len != HMACS[hmac].key)
            || (hmac < 0 && integ.len != 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "SaCipher needs cipher gcm/chacha20poly1305/ctr/cbc with a 16/32-byte "
                        "key (32 for ChaCha20), a 4-byte salt (none for cbc), an HMAC digest "
                        "sha1/sha256/sha384/sha512 with its key for ctr/cbc, a 32-bit spi");
        goto done;
    }
    self->spi = (uint32_t)spi;
    self->esn = esn;
    self->iv_size = self->kind == CBC ? CBC_IV_SIZE : IV_SIZE;
    self->align = self->kind == CBC ? BLOCK : 4;
    self->icv_size = hmac >= 0 ? HMACS[hmac].icv : AEAD_TAG_SIZE;
    self->min_packet = SPI_SEQ_SIZE + self->iv_size + (self->kind == CBC ? BLOCK : 2)
        + self->icv_size;
    memcpy(self->salt, salt.buf, (size_t)salt.len);
    self->cipher = cipher_ctx(name, key.buf, 1);
    if (self->cipher == NULL) {
        openssl_failed("cipher setup");
        goto done;
    }
    self->decipher = self->cipher;
    if (self->kind == CBC) {
        self->decipher = cipher_ctx(key.len == 16 ? "AES-128-CBC" : "AES-256-CBC", key.buf, 0);
        if (self->decipher == NULL) {
            openssl_failed("decryption setup");
            goto done;
        }
        self->ivgen = cipher_ctx(key.len == 16 ? "AES-128-ECB" : "AES-256-ECB", key.buf, 1);
        if (self->ivgen == NULL) {
            openssl_failed("IV cipher setup");
            goto done;
        }
    }
    if (hmac >= 0) {
        /* The keyed state is reused and reset per packet (EVP_MAC_init with a
         * NULL key). */
        EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
        OSSL_PARAM params[] = {
            OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                             (char *)HMACS[hmac].digest, 0),
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
    if (self->decipher != self->cipher)
        EVP_CIPHER_CTX_free(self->decipher);
    EVP_CIPHER_CTX_free(self->ivgen);
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

/* ---- the transforms, one direction each ------------------------------- */

/* The 16-byte IV block: the AEAD nonce salt | IV (RFC 4106 §4, RFC 7634 §2:
 * the first 12 bytes), or the CTR counter block nonce | IV | 1 (RFC 3686 §4). */
static void iv_block(const SaCipher *self, const unsigned char *iv8, unsigned char out[16]) {
    memcpy(out, self->salt, SALT_SIZE);
    memcpy(out + SALT_SIZE, iv8, 8);
    put32(out + 12, 1);
}

/* RFC 4106 §5, RFC 7634 §4: AAD is SPI | seq (8 bytes), or SPI | seq high |
 * seq low with ESN. */
static int aead_aad(SaCipher *self, const unsigned char *header, uint32_t seq_high) {
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

/* The truncated HMAC over data, then with ESN the unsent high half of the
 * sequence number (RFC 4303 §2.2.1, §3.3.2.1); icv_size bytes go to icv. */
static int hmac_icv(SaCipher *self, const unsigned char *data, size_t n, uint32_t seq_high,
                    unsigned char icv[MAX_ICV]) {
    unsigned char full[64], high[4];
    size_t outl = 0;
    put32(high, seq_high);
    int ok = EVP_MAC_init(self->mac, NULL, 0, NULL) == 1
        && EVP_MAC_update(self->mac, data, n) == 1
        && (!self->esn || EVP_MAC_update(self->mac, high, 4) == 1)
        && EVP_MAC_final(self->mac, full, &outl, sizeof full) == 1
        && outl >= (size_t)self->icv_size;
    memcpy(icv, full, (size_t)self->icv_size);
    OPENSSL_cleanse(full, sizeof full);
    return ok;
}

/* Point the cipher at a new IV (key schedule kept); CBC without padding. */
static int cipher_start(SaCipher *self, EVP_CIPHER_CTX *ctx, int enc, const unsigned char *iv) {
    int ok = enc ? EVP_EncryptInit_ex2(ctx, NULL, NULL, iv, NULL) == 1
                 : EVP_DecryptInit_ex2(ctx, NULL, NULL, iv, NULL) == 1;
    return ok && (self->kind != CBC || EVP_CIPHER_CTX_set_padding(ctx, 0) == 1);
}

/* ---- protect ------------------------------------------------------------ */

/* One ESP packet for the inner packet ``inner`` of ``len`` bytes; NULL with
 * MalformedMessage (not IPv4/IPv6, empty, too large) or RuntimeError set. */
static PyObject *seal_one(SaCipher *self, unsigned long long seq, unsigned long long iv,
                          const unsigned char *inner, Py_ssize_t len) {
    PyObject *result = NULL;
    int nh = len > 0 ? next_header_of(inner[0]) : -1;
    if (len == 0) {
        PyErr_SetString(MalformedMessage, "inner packet is empty");
        return NULL;
    }
    if (nh < 0) {
        PyErr_Format(MalformedMessage, "inner packet is not IPv4/IPv6 (version %d)",
                     inner[0] >> 4);
        return NULL;
    }
    if (len > MAX_PACKET) {
        PyErr_SetString(MalformedMessage, "inner packet too large");
        return NULL;
    }
    /* RFC 4303 §2.4: padding 1, 2, 3, ... so that Pad Length and Next Header
     * end on a 4-byte boundary (block size 1: GCM, ChaCha20, CTR) or on a
     * 16-byte one (CBC). */
    int n = (int)len, al = self->align, pad = (al - (n + 2) % al) % al, payload = n + pad + 2;
    int header = SPI_SEQ_SIZE + self->iv_size, aead = self->mac == NULL;
    unsigned char trailer[BLOCK + 2];
    for (int i = 0; i < pad; i++)
        trailer[i] = (unsigned char)(i + 1);
    trailer[pad] = (unsigned char)pad;
    trailer[pad + 1] = (unsigned char)nh;
    result = PyBytes_FromStringAndSize(NULL, header + payload + self->icv_size);
    if (result == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    unsigned char block[16], *ct = out + header, *icv = ct + payload, *ivp = block;
    put32(out, self->spi);                       /* RFC 4303 §2.1, §2.2: low 32 bits sent */
    put32(out + 4, (uint32_t)seq);
    uint32_t seq_high = (uint32_t)(seq >> 32);
    int l1, l2, l3, ok = 1;
    if (self->kind == CBC) {
        /* SP 800-38A Appendix C: the IV is E_K(prefix | sender_id | counter). */
        memcpy(block, CBC_IV_PREFIX, 8);
        put32(block + 8, (uint32_t)(iv >> 32));
        put32(block + 12, (uint32_t)iv);
        ok = EVP_EncryptUpdate(self->ivgen, out + 8, &l1, block, BLOCK) == 1 && l1 == BLOCK;
        ivp = out + 8;
    } else {
        put32(out + 8, (uint32_t)(iv >> 32));
        put32(out + 12, (uint32_t)iv);
        iv_block(self, out + 8, block);
    }
    ok = ok && cipher_start(self, self->cipher, 1, ivp)
        && (!aead || aead_aad(self, out, seq_high))
        && EVP_EncryptUpdate(self->cipher, ct, &l1, inner, n) == 1
        && EVP_EncryptUpdate(self->cipher, ct + l1, &l2, trailer, pad + 2) == 1
        && EVP_EncryptFinal_ex(self->cipher, ct + l1 + l2, &l3) == 1
        && l1 + l2 + l3 == payload;
    if (ok && aead)                  /* RFC 4106 §2, RFC 7634 §2: the tag is the ICV */
        ok = EVP_CIPHER_CTX_ctrl(self->cipher, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG_SIZE, icv) == 1;
    else if (ok)                     /* RFC 4303 §3.3.4: encrypt, then MAC */
        ok = hmac_icv(self, out, (size_t)(header + payload), seq_high, icv);
    if (!ok) {
        Py_CLEAR(result);
        openssl_failed("encryption");
    }
    return result;
}

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
    PyObject *result = seal_one(self, seq, iv, in.buf, in.len);
    PyBuffer_Release(&in);
    return result;
}

/* If the error set is an instance of ``cls``, clear it and return the
 * exception object (a new reference); else leave it set and return NULL. */
static PyObject *take_error(PyObject *cls) {
    if (!PyErr_ExceptionMatches(cls))
        return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* seal_batch(first_seq, first_iv, inners) -> list: per inner packet, in order,
 * what seal(seq, iv, inner) gives, with seq and iv starting at first_seq and
 * first_iv and advancing by one per packet sealed; a refused inner packet
 * (MalformedMessage) takes no number and stands in the list as the exception
 * object.  The caller keeps the whole batch inside one IV block and below the
 * SA's next checkpoint (common/esp/transforms.py OutboundSA.seal_batch). */
static PyObject *SaCipher_seal_batch(SaCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self))
        return NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "seal_batch(first_seq, first_iv, inners) takes 3 arguments");
        return NULL;
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[0]);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long iv = PyLong_AsUnsignedLongLong(args[1]);
    if (iv == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *seqobj = PySequence_Fast(args[2], "seal_batch needs a sequence of inner packets");
    if (seqobj == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seqobj);
    PyObject **items = PySequence_Fast_ITEMS(seqobj);
    PyObject *out = PyList_New(count);
    for (Py_ssize_t i = 0; out != NULL && i < count; i++) {
        Py_buffer in;
        if (PyObject_GetBuffer(items[i], &in, PyBUF_SIMPLE) < 0) {
            Py_CLEAR(out);
            break;
        }
        PyObject *esp = seal_one(self, seq, iv, in.buf, in.len);
        PyBuffer_Release(&in);
        if (esp != NULL) {
            seq++;
            iv++;
        } else if ((esp = take_error(MalformedMessage)) == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, esp);   /* steals the reference */
    }
    Py_DECREF(seqobj);
    return out;
}

/* ---- unprotect ---------------------------------------------------------- */

static int check_size(SaCipher *self, Py_ssize_t n) {
    if (n < self->min_packet) {
        PyErr_Format(MalformedMessage, "ESP packet too short: %zd bytes, need at least %d",
                     n, self->min_packet);
        return 0;
    }
    if (n > MAX_PACKET) {
        PyErr_SetString(MalformedMessage, "ESP packet too large");
        return 0;
    }
    if (self->kind == CBC && (n - SPI_SEQ_SIZE - CBC_IV_SIZE - self->icv_size) % BLOCK) {
        PyErr_SetString(MalformedMessage, "ESP ciphertext is not a whole number of blocks");
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
    if (check_size(self, in.len)) {
        uint32_t spi = get32(in.buf);
        if (spi != self->spi)
            PyErr_Format(MalformedMessage, "ESP packet for SPI 0x%08x reached SA 0x%08x",
                         (unsigned int)spi, (unsigned int)self->spi);
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
static PyObject *open_one(SaCipher *self, const Py_buffer *pin, unsigned long seq_high) {
    const Py_buffer in = *pin;
    PyObject *result = NULL;
    if (!check_size(self, in.len))
        goto done;
    const unsigned char *packet = in.buf;
    int header = SPI_SEQ_SIZE + self->iv_size, aead = self->mac == NULL;
    int ctlen = (int)in.len - header - self->icv_size, l1, l2;
    unsigned char block[16], tag[MAX_ICV];
    const unsigned char *ivp = packet + SPI_SEQ_SIZE;
    memcpy(tag, packet + in.len - self->icv_size, (size_t)self->icv_size);
    if (!aead) {
        /* RFC 4303 §3.4.4: verify the ICV before decrypting; constant time. */
        unsigned char icv[MAX_ICV];
        if (!hmac_icv(self, packet, (size_t)in.len - (size_t)self->icv_size,
                      (uint32_t)seq_high, icv)) {
            openssl_failed("HMAC");
            goto done;
        }
        if (CRYPTO_memcmp(icv, tag, (size_t)self->icv_size) != 0) {
            PyErr_SetString(IntegrityError, "ESP ICV check failed");
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(NULL, ctlen);
    if (result == NULL)
        goto done;
    unsigned char *plain = (unsigned char *)PyBytes_AS_STRING(result);
    if (self->kind != CBC) {
        iv_block(self, packet + SPI_SEQ_SIZE, block);
        ivp = block;
    }
    EVP_CIPHER_CTX *ctx = self->decipher;
    int ok = cipher_start(self, ctx, 0, ivp)
        && (!aead || aead_aad(self, packet, (uint32_t)seq_high))
        && EVP_DecryptUpdate(ctx, plain, &l1, packet + header, ctlen) == 1
        && (!aead
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, AEAD_TAG_SIZE, tag) == 1);
    if (!ok) {
        Py_CLEAR(result);
        openssl_failed("decryption");
        goto done;
    }
    /* For the AEADs the tag is checked here (EVP compares it in constant time). */
    if (EVP_DecryptFinal_ex(ctx, plain + l1, &l2) != 1 || l1 + l2 != ctlen) {
        ERR_clear_error();
        OPENSSL_cleanse(plain, (size_t)ctlen);   /* unauthenticated plaintext */
        Py_CLEAR(result);
        if (aead)
            PyErr_Format(IntegrityError, "ESP ICV check failed (SPI 0x%08x)",
                         (unsigned int)self->spi);
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
    return result;
}

static int seq_high_of(PyObject *obj, unsigned long *out) {
    *out = PyLong_AsUnsignedLong(obj);
    if (*out == (unsigned long)-1 && PyErr_Occurred())
        return 0;
    if (*out > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "seq_high is 32 bits");
        return 0;
    }
    return 1;
}

static PyObject *SaCipher_open(SaCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open(packet, seq_high) takes 2 arguments");
        return NULL;
    }
    unsigned long seq_high;
    if (!seq_high_of(args[1], &seq_high))
        return NULL;
    Py_buffer in;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = open_one(self, &in, seq_high);
    PyBuffer_Release(&in);
    return result;
}

/* open_batch(packets, seq_highs) -> list of (seq_low, result), one per packet
 * in order: what peek then open(packet, seq_high) give.  ``seq_highs`` is a
 * sequence as long as ``packets``, or None for all 0 (no ESN).  A packet of
 * impossible size or foreign SPI is (-1, MalformedMessage object); else
 * seq_low is the 32-bit number on the wire and result the inner bytes, None
 * (authentic, malformed trailer) or the IntegrityError object.  No state is
 * kept: the replay window and counters are the caller's (InboundSA.open_batch). */
static PyObject *SaCipher_open_batch(SaCipher *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open_batch(packets, seq_highs) takes 2 arguments");
        return NULL;
    }
    PyObject *pkts = PySequence_Fast(args[0], "open_batch needs a sequence of packets");
    if (pkts == NULL)
        return NULL;
    PyObject *highs = NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(pkts);
    if (args[1] != Py_None) {
        highs = PySequence_Fast(args[1], "open_batch needs seq_highs as a sequence or None");
        if (highs == NULL) {
            Py_DECREF(pkts);
            return NULL;
        }
        if (PySequence_Fast_GET_SIZE(highs) != count) {
            PyErr_SetString(PyExc_ValueError, "open_batch: seq_highs and packets differ in length");
            Py_DECREF(pkts);
            Py_DECREF(highs);
            return NULL;
        }
    }
    PyObject *out = PyList_New(count);
    for (Py_ssize_t i = 0; out != NULL && i < count; i++) {
        unsigned long seq_high = 0;
        PyObject *res = NULL, *seq = NULL;
        Py_buffer in;
        if (highs != NULL && !seq_high_of(PySequence_Fast_GET_ITEM(highs, i), &seq_high)) {
            Py_CLEAR(out);
            break;
        }
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(pkts, i), &in, PyBUF_SIMPLE) < 0) {
            Py_CLEAR(out);
            break;
        }
        if (!check_size(self, in.len)) {
            res = take_error(MalformedMessage);
            seq = PyLong_FromLong(-1);
        } else if (get32(in.buf) != self->spi) {
            PyErr_Format(MalformedMessage, "ESP packet for SPI 0x%08x reached SA 0x%08x",
                         (unsigned int)get32(in.buf), (unsigned int)self->spi);
            res = take_error(MalformedMessage);
            seq = PyLong_FromLong(-1);
        } else {
            res = open_one(self, &in, seq_high);
            if (res == NULL)
                res = take_error(IntegrityError);
            if (res == NULL)
                res = take_error(MalformedMessage);
            seq = PyLong_FromUnsignedLong(get32((unsigned char *)in.buf + 4));
        }
        PyBuffer_Release(&in);
        PyObject *pair = res != NULL && seq != NULL ? PyTuple_Pack(2, seq, res) : NULL;
        Py_XDECREF(res);
        Py_XDECREF(seq);
        if (pair == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, pair);   /* steals the reference */
    }
    Py_DECREF(pkts);
    Py_XDECREF(highs);
    return out;
}

/* ---- type and module ---------------------------------------------------- */

static PyMethodDef SaCipher_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))SaCipher_seal, METH_FASTCALL,
     "seal(seq, iv, inner) -> SPI | seq | IV | ciphertext | ICV"},
    {"peek", (PyCFunction)SaCipher_peek, METH_O,
     "peek(packet) -> the 32-bit sequence number, after the size and SPI checks"},
    {"open", (PyCFunction)(void (*)(void))SaCipher_open, METH_FASTCALL,
     "open(packet, seq_high) -> the inner packet, or None if authentic but malformed"},
    {"seal_batch", (PyCFunction)(void (*)(void))SaCipher_seal_batch, METH_FASTCALL,
     "seal_batch(first_seq, first_iv, inners) -> [ESP bytes | MalformedMessage]"},
    {"open_batch", (PyCFunction)(void (*)(void))SaCipher_open_batch, METH_FASTCALL,
     "open_batch(packets, seq_highs | None) -> [(seq_low, inner | None | error)]"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SaCipherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "common.esp._esp_fast.SaCipher",
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
 * The compiled twin of common/esp/selectors.py (``five_tuple``, ``packet_matches``),
 * which stays the reference: same fields, same MalformedMessage cases, the
 * tests compare the two.  A compiled side is a bytes object of SEL_SIZE
 * records (common.esp.selectors.compile_blob, struct "=BBxxii16s16s"): version,
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
     "match_selectors(src_blob, dst_blob, packet) -> bool (common.esp.selectors.packet_matches)"},
    {"five_tuple", (PyCFunction)esp_fast_five_tuple, METH_O,
     "five_tuple(packet) -> (version, src, dst, protocol, sport, dport)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef esp_fast_module = {
    PyModuleDef_HEAD_INIT, .m_name = "common.esp._esp_fast",
    .m_doc = "Compiled ESP byte primitive (see common/esp/transforms.py).", .m_size = -1,
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
