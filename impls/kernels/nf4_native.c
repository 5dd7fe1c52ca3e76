/* NF4 (bitsandbytes storage) CPU kernels: AVX-512F + OpenMP, no torch headers (compiles in about a second).
 *
 * Built at first use by impls/nf4_native.py (cached by source hash) and called through ctypes on tensors'
 * data pointers; Python checks shapes, dtypes and contiguity. Weight layout, as bnb stores it: packed uint8
 * [N, K/2] row-major, the high nibble of a byte is the even column; fp32 scales [N * K / bs] (one per block of
 * bs consecutive elements; bs a multiple of 32 dividing K). A "chunk" is 16 bytes = 32 columns: its high
 * nibbles are the 16 even columns, its low nibbles the 16 odd ones.
 *
 * The trick: vpermps (_mm512_permutexvar_ps) looks 16 nibbles up in the 16-entry NF4 code held in one
 * register, so a chunk decodes to 32 fp32 weights in five instructions and W is never written out.
 * Compile with -ffp-contract=off: the dequantised values must be the plain fp32 product code * absmax
 * (bit-identical to bnb and the reference), not a fused multiply-add.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

typedef int64_t i64;

#define MAX_ROWS 8 /* rows of x handled by one GEMV call (Python splits larger batches) */

static inline void decode_chunk(const uint8_t *p, __m512 code, __m512 *even, __m512 *odd) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code);
    *odd = _mm512_permutexvar_ps(v, code); /* vpermps reads only the index's low 4 bits: the low nibble */
}

/* Double-quantised absmax: scale[i] = code2[q[i]] * absmax2[i / 256] + offset, rounded as bnb does (two
 * fp32 roundings, no FMA). */
void nf4_decode_absmax(const uint8_t *q, const float *absmax2, const float *code2, float offset, float *out,
                       i64 nblocks) {
    for (i64 i = 0; i < nblocks; i++) out[i] = code2[q[i]] * absmax2[i / 256] + offset;
}

/* y[m, n] = sum_k x[m, k] W[n, k] for rows [n0, n1); xp is x in chunk order [M, K/32, 2, 16] (even columns,
 * then odd, per chunk), fp32. Accumulates in fp32; each block's partial sum is scaled once. */
static inline __attribute__((always_inline)) void gemv_rows(const uint8_t *packed, const float *scales,
                                                            const float *xp, float *y, i64 N, i64 K, i64 bs,
                                                            i64 n0, i64 n1, const int R, __m512 code) {
    const i64 half = K / 2, nb = K / bs, cpb = bs / 32;
    for (i64 n = n0; n < n1; n++) {
        const uint8_t *row = packed + n * half;
        const float *srow = scales + n * nb;
        __m512 acc[MAX_ROWS];
        for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
        for (i64 b = 0; b < nb; b++) {
            __m512 be[MAX_ROWS], bo[MAX_ROWS];
            for (int m = 0; m < R; m++) be[m] = bo[m] = _mm512_setzero_ps();
            for (i64 c = b * cpb; c < (b + 1) * cpb; c++) {
                __m512 we, wo;
                decode_chunk(row + c * 16, code, &we, &wo);
                for (int m = 0; m < R; m++) {
                    const float *xc = xp + m * K + c * 32;
                    be[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xc), be[m]);
                    bo[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xc + 16), bo[m]);
                }
            }
            __m512 s = _mm512_set1_ps(srow[b]);
            for (int m = 0; m < R; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(be[m], bo[m]), s, acc[m]);
        }
        for (int m = 0; m < R; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
    }
}

static inline void thread_range(i64 total, i64 *lo, i64 *hi) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *lo = total * t / nt;
    *hi = total * (t + 1) / nt;
}

/* Forward: y fp32 [M, N], M <= MAX_ROWS. Threads split the rows of W. Returns 0, or -1 on bad arguments. */
int nf4_gemv(const uint8_t *packed, const float *scales, const float *code16, const float *xp, float *y, i64 M,
             i64 N, i64 K, i64 bs, int threads) {
    if (M < 1 || M > MAX_ROWS || bs < 32 || bs % 32 || K % bs) return -1;
    const __m512 code = _mm512_loadu_ps(code16);
#pragma omp parallel num_threads(threads)
    {
        i64 n0, n1;
        thread_range(N, &n0, &n1);
        switch (M) { /* constant row counts: the accumulators stay in registers */
        case 1: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 1, code); break;
        case 2: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 2, code); break;
        case 3: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 3, code); break;
        case 4: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 4, code); break;
        case 5: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 5, code); break;
        case 6: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 6, code); break;
        case 7: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 7, code); break;
        default: gemv_rows(packed, scales, xp, y, N, K, bs, n0, n1, 8, code); break;
        }
    }
    return 0;
}

/* dx[m, k] = sum_n g[m, n] W[n, k] over the blocks [b0, b1) of every row; dx in chunk order [M, K/32, 2, 16]
 * (its slice zeroed here). G rows of W are folded into each load/store of dx (register blocking). */
static inline __attribute__((always_inline)) void gemv_t_cols(const uint8_t *packed, const float *scales,
                                                              const float *g, float *dx, i64 N, i64 K, i64 bs,
                                                              i64 b0, i64 b1, const int R, const int G,
                                                              __m512 code) {
    const i64 half = K / 2, nb = K / bs, cpb = bs / 32;
    for (int m = 0; m < R; m++) memset(dx + m * K + b0 * bs, 0, (size_t)((b1 - b0) * bs) * sizeof(float));
    for (i64 n = 0; n < N; n += G) {
        const int rows = N - n < G ? (int)(N - n) : G;
        for (i64 b = b0; b < b1; b++) {
            __m512 coef[8][MAX_ROWS];
            for (int j = 0; j < G; j++)
                for (int m = 0; m < R; m++)
                    coef[j][m] = _mm512_set1_ps(j < rows ? g[m * N + n + j] * scales[(n + j) * nb + b] : 0.0f);
            for (i64 c = b * cpb; c < (b + 1) * cpb; c++) {
                __m512 e[MAX_ROWS], o[MAX_ROWS];
                for (int m = 0; m < R; m++) {
                    e[m] = _mm512_loadu_ps(dx + m * K + c * 32);
                    o[m] = _mm512_loadu_ps(dx + m * K + c * 32 + 16);
                }
                for (int j = 0; j < G; j++) {
                    if (j >= rows) break;
                    __m512 we, wo;
                    decode_chunk(packed + (n + j) * half + c * 16, code, &we, &wo);
                    for (int m = 0; m < R; m++) {
                        e[m] = _mm512_fmadd_ps(coef[j][m], we, e[m]);
                        o[m] = _mm512_fmadd_ps(coef[j][m], wo, o[m]);
                    }
                }
                for (int m = 0; m < R; m++) {
                    _mm512_storeu_ps(dx + m * K + c * 32, e[m]);
                    _mm512_storeu_ps(dx + m * K + c * 32 + 16, o[m]);
                }
            }
        }
    }
}

/* Backward (input gradient): g fp32 [M, N] -> dx fp32 [M, K] in chunk order. Threads split the columns
 * (whole blocks), so each thread's slice of dx stays in cache and no reduction is needed. */
int nf4_gemv_t(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx, i64 M,
               i64 N, i64 K, i64 bs, int threads) {
    if (M < 1 || M > MAX_ROWS || bs < 32 || bs % 32 || K % bs) return -1;
    const __m512 code = _mm512_loadu_ps(code16);
#pragma omp parallel num_threads(threads)
    {
        i64 b0, b1;
        thread_range(K / bs, &b0, &b1);
        switch (M) {
        case 1: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 1, 4, code); break;
        case 2: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 2, 4, code); break;
        case 3: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 3, 4, code); break;
        case 4: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 4, 4, code); break;
        case 5: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 5, 2, code); break;
        case 6: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 6, 2, code); break;
        case 7: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 7, 2, code); break;
        default: gemv_t_cols(packed, scales, g, dx, N, K, bs, b0, b1, 8, 2, code); break;
        }
    }
    return 0;
}

/* fp32 -> bf16, round to nearest even (what torch's .to(torch.bfloat16) does); AVX-512F only. */
static inline __m256i to_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

/* W in natural order, out [numel] as fp32 (kind 0), bf16 (1) or fp16 (2): code * absmax in fp32, then
 * rounded to nearest even, bit-identical to bnb's dequantize_4bit and to the reference. numel % 32 == 0. */
int nf4_dequantize(const uint8_t *packed, const float *scales, const float *code16, void *out, i64 numel, i64 bs,
                   int kind, int threads) {
    if (numel % 32 || bs < 32 || bs % 32 || kind < 0 || kind > 2) return -1;
    const __m512 code = _mm512_loadu_ps(code16);
    /* natural column 2j is even[j], 2j+1 is odd[j]: interleave the two halves */
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const i64 chunks = numel / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 c = 0; c < chunks; c++) {
        __m512 we, wo;
        decode_chunk(packed + c * 16, code, &we, &wo);
        const __m512 s = _mm512_set1_ps(scales[c * 32 / bs]);
        we = _mm512_mul_ps(we, s);
        wo = _mm512_mul_ps(wo, s);
        const __m512 lo = _mm512_permutex2var_ps(we, lo_idx, wo), hi = _mm512_permutex2var_ps(we, hi_idx, wo);
        if (kind == 0) {
            float *o = (float *)out + c * 32;
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o + 16, hi);
        } else {
            uint16_t *o = (uint16_t *)out + c * 32;
            __m256i l16, h16;
            if (kind == 1) {
                l16 = to_bf16(lo);
                h16 = to_bf16(hi);
            } else {
                l16 = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                h16 = _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            }
            _mm256_storeu_si256((__m256i *)o, l16);
            _mm256_storeu_si256((__m256i *)(o + 16), h16);
        }
    }
    return 0;
}

/* Lets Python confirm it loaded this source's build. */
int nf4_native_abi(void) { return 1; }
