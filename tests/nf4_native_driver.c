/* A stand-alone caller of impls/kernels/nf4_native.c's exported kernels, for builds Python cannot load here: the
 * NEON layer cross-compiled for aarch64 and run under qemu-aarch64 (tests/test_nf4_neon.py writes the calls,
 * runs this, and compares what it writes with the x86 build's results).
 *
 *     nf4_native_driver CALLS OUT THREADS
 *
 * CALLS: a sequence of calls, each: int64 op, int64 nparams, nparams int64, int64 narrays, then narrays times
 * (int64 nbytes, the bytes); an array of 0 bytes is passed as NULL. OUT: for each call, int64 nbytes and the
 * call's outputs (concatenated, in the order listed per op below). Little-endian, native layout. A kernel that
 * refuses its arguments, or a malformed file, ends the run with exit status 1 and a line on stderr.
 *
 * -DNF4_DRIVER_PLANT_CODE=i builds a driver that changes code entry i before every call (a planted error the
 * test must see). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

int nf4_gemv(const uint8_t *packed, const float *scales, const float *code16, const void *x, int x_bf16, float *y,
             i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2, const float *code2,
             float offset);
int nf4_gemv_t(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx, i64 M,
               i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2, const float *code2,
               float offset);
int nf4_lora_gemv(const uint8_t *packed, const float *scales, const float *code16, const float *x, float *y, i64 M,
                  i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2, const float *code2,
                  float offset, i64 rank, const void *a, const void *b, int ab_bf16, const float *bias,
                  float scaling, float *xa);
int nf4_lora_gemv_t(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx,
                    i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2,
                    const float *code2, float offset, i64 rank, const void *a, const void *b, int ab_bf16,
                    const float *xa, float scaling, const float *x, void *da, void *db);
int nf4_dequantize(const uint8_t *packed, const float *scales, const float *code16, void *out, i64 numel, i64 bs,
                   int kind, int threads, int stream);
int nf4_dequantize_panel(const uint8_t *packed, const float *scales, const float *code16, void *out, i64 N, i64 K,
                         i64 bs, i64 r0, i64 r1, i64 c0, i64 c1, i64 ld, int kind, int threads, int fast_bf16);
void nf4_decode_absmax(const uint8_t *q, const float *absmax2, const float *code2, float offset, float *out,
                       i64 nblocks);
int nf4_first_touch_copy(const uint8_t *src, uint8_t *dst, i64 rows, i64 row_bytes, int threads);
int nf4_native_isa(void);

/* the ops of the calls file (tests/test_nf4_neon.py: Op) */
enum { OP_ISA, OP_DEQUANTIZE, OP_PANEL, OP_DECODE_ABSMAX, OP_GEMV, OP_GEMV_T, OP_LORA_GEMV, OP_LORA_GEMV_T,
       OP_FIRST_TOUCH };

#define MAX_PARAMS 16
#define MAX_ARRAYS 16

typedef struct {
    i64 op, nparams, narrays;
    i64 param[MAX_PARAMS];
    i64 nbytes[MAX_ARRAYS];
    void *array[MAX_ARRAYS]; /* NULL for 0 bytes */
} call_t;

static void fail(const char *what) {
    fprintf(stderr, "nf4_native_driver: %s\n", what);
    exit(1);
}

static i64 read_i64(FILE *f, int *eof) {
    i64 v;
    if (fread(&v, 8, 1, f) != 1) {
        if (eof && feof(f)) {
            *eof = 1;
            return 0;
        }
        fail("truncated calls file");
    }
    return v;
}

static int read_call(FILE *f, call_t *c) {
    int eof = 0;
    c->op = read_i64(f, &eof);
    if (eof) return 0;
    c->nparams = read_i64(f, NULL);
    if (c->nparams < 0 || c->nparams > MAX_PARAMS) fail("bad parameter count");
    for (i64 i = 0; i < c->nparams; i++) c->param[i] = read_i64(f, NULL);
    c->narrays = read_i64(f, NULL);
    if (c->narrays < 0 || c->narrays > MAX_ARRAYS) fail("bad array count");
    for (i64 i = 0; i < c->narrays; i++) {
        c->nbytes[i] = read_i64(f, NULL);
        if (c->nbytes[i] < 0) fail("bad array size");
        c->array[i] = NULL;
        if (!c->nbytes[i]) continue;
        c->array[i] = aligned_alloc(64, (size_t)((c->nbytes[i] + 63) / 64 * 64)); /* a multiple of the alignment */
        if (!c->array[i]) fail("out of memory");
        if (fread(c->array[i], 1, (size_t)c->nbytes[i], f) != (size_t)c->nbytes[i]) fail("truncated array");
    }
    return 1;
}

static void *out_buf(i64 nbytes) {
    void *p = calloc(1, (size_t)(nbytes ? nbytes : 1));
    if (!p) fail("out of memory");
    return p;
}

static void need(const call_t *c, i64 params, i64 arrays) {
    if (c->nparams != params || c->narrays != arrays) fail("wrong parameter or array count for the op");
}

static void check(int rc, const char *kernel) {
    if (rc != 0) {
        fprintf(stderr, "nf4_native_driver: %s returned %d\n", kernel, rc);
        exit(1);
    }
}

static float f32_of(const call_t *c, int i) { /* a 4-byte array holding one float (offset, scaling) */
    if (c->nbytes[i] != 4) fail("a scalar float array must be 4 bytes");
    return *(const float *)c->array[i];
}

/* Runs call c, returning its outputs in *out (malloc'd) and their size. Weight arrays of the GEMV ops, in order:
 * packed, fp32 scales (or none), code16, q, absmax2, code2 (or none), offset. */
static i64 run(call_t *c, int threads, void **out) {
    const i64 *p = c->param;
    void **a = c->array;
#ifdef NF4_DRIVER_PLANT_CODE
    if (c->op != OP_ISA && c->op != OP_DECODE_ABSMAX && c->op != OP_FIRST_TOUCH)
        ((float *)a[2])[NF4_DRIVER_PLANT_CODE] += 0.01f; /* the code table is array 2 of every op that reads it */
#endif
    switch (c->op) {
    case OP_ISA: {
        need(c, 0, 0);
        int *isa = out_buf(4);
        *isa = nf4_native_isa();
        *out = isa;
        return 4;
    }
    case OP_DEQUANTIZE: { /* params numel, bs, kind; arrays packed, scales, code16 */
        need(c, 3, 3);
        const i64 bytes = p[0] * (p[2] ? 2 : 4);
        *out = out_buf(bytes);
        /* stream asked for: the NEON layer has no non-temporal stores and ignores it */
        check(nf4_dequantize(a[0], a[1], a[2], *out, p[0], p[1], (int)p[2], threads, 1), "nf4_dequantize");
        return bytes;
    }
    case OP_PANEL: { /* params N, K, bs, r0, r1, c0, c1, kind; arrays packed, scales, code16 */
        need(c, 8, 3);
        const i64 cols = p[6] - p[5], bytes = (p[4] - p[3]) * cols * (p[7] ? 2 : 4);
        *out = out_buf(bytes);
        check(nf4_dequantize_panel(a[0], a[1], a[2], *out, p[0], p[1], p[2], p[3], p[4], p[5], p[6], cols,
                                   (int)p[7], threads, 1),
              "nf4_dequantize_panel");
        return bytes;
    }
    case OP_DECODE_ABSMAX: { /* params nblocks; arrays q, absmax2, code2, offset */
        need(c, 1, 4);
        *out = out_buf(p[0] * 4);
        nf4_decode_absmax(a[0], a[1], a[2], f32_of(c, 3), *out, p[0]);
        return p[0] * 4;
    }
    case OP_GEMV: { /* params x_bf16, M, N, K, bs; arrays (weight: 7), x -> y [M, N] */
        need(c, 5, 8);
        *out = out_buf(p[1] * p[2] * 4);
        check(nf4_gemv(a[0], a[1], a[2], a[7], (int)p[0], *out, p[1], p[2], p[3], p[4], threads, a[3], a[4], a[5],
                       f32_of(c, 6)),
              "nf4_gemv");
        return p[1] * p[2] * 4;
    }
    case OP_GEMV_T: { /* params M, N, K, bs; arrays (weight: 7), g -> dx [M, K] */
        need(c, 4, 8);
        *out = out_buf(p[0] * p[2] * 4);
        check(nf4_gemv_t(a[0], a[1], a[2], a[7], *out, p[0], p[1], p[2], p[3], threads, a[3], a[4], a[5],
                         f32_of(c, 6)),
              "nf4_gemv_t");
        return p[0] * p[2] * 4;
    }
    case OP_LORA_GEMV: { /* params M, N, K, bs, rank, ab_bf16; arrays (weight: 7), x, A, B, bias, scaling
                          * -> y [M, N], xa [M, rank] */
        need(c, 6, 12);
        const i64 ybytes = p[0] * p[1] * 4, bytes = ybytes + p[0] * p[4] * 4;
        char *o = out_buf(bytes);
        check(nf4_lora_gemv(a[0], a[1], a[2], a[7], (float *)o, p[0], p[1], p[2], p[3], threads, a[3], a[4], a[5],
                            f32_of(c, 6), p[4], a[8], a[9], (int)p[5], a[10], f32_of(c, 11),
                            p[4] ? (float *)(o + ybytes) : NULL),
              "nf4_lora_gemv");
        *out = o;
        return bytes;
    }
    case OP_LORA_GEMV_T: { /* params M, N, K, bs, rank, ab_bf16; arrays (weight: 7), g, A, B, xa, scaling, x
                            * -> dx [M, K] fp32, dA [rank, K], dB [N, rank] (in A's and B's dtype) */
        need(c, 6, 13);
        const i64 es = p[5] ? 2 : 4, dxb = p[0] * p[2] * 4, dab = p[4] * p[2] * es, bytes = dxb + dab + p[1] * p[4] * es;
        char *o = out_buf(bytes);
        check(nf4_lora_gemv_t(a[0], a[1], a[2], a[7], (float *)o, p[0], p[1], p[2], p[3], threads, a[3], a[4], a[5],
                              f32_of(c, 6), p[4], a[8], a[9], (int)p[5], a[10], f32_of(c, 11), a[12], o + dxb,
                              o + dxb + dab),
              "nf4_lora_gemv_t");
        *out = o;
        return bytes;
    }
    case OP_FIRST_TOUCH: { /* params rows, row_bytes; arrays src */
        need(c, 2, 1);
        *out = out_buf(p[0] * p[1]);
        check(nf4_first_touch_copy(a[0], *out, p[0], p[1], threads), "nf4_first_touch_copy");
        return p[0] * p[1];
    }
    default:
        fail("unknown op");
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: nf4_native_driver CALLS OUT THREADS\n");
        return 2;
    }
    const int threads = atoi(argv[3]);
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out || threads < 1) fail("cannot open the files, or THREADS < 1");
    call_t c;
    while (read_call(in, &c)) {
        void *result = NULL;
        const i64 bytes = run(&c, threads, &result);
        if (fwrite(&bytes, 8, 1, out) != 1 || fwrite(result, 1, (size_t)bytes, out) != (size_t)bytes)
            fail("cannot write the outputs");
        free(result);
        for (i64 i = 0; i < c.narrays; i++) free(c.array[i]);
    }
    fclose(in);
    if (fclose(out)) fail("cannot write the outputs");
    return 0;
}
