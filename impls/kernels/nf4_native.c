/* NF4 (bitsandbytes storage) CPU kernels: AVX-512, AVX2 (+FMA, F16C) or aarch64 NEON, and OpenMP, no torch headers
 * (a build takes 2-5 s: AVX2 ~2 s, AVX-512 ~5 s on a 2-core VM). One source, three builds:
 * impls/kernels/nf4_native.py compiles it with the AVX-512 flags, the AVX2 ones or (on aarch64) the NEON ones (the
 * `#if` below picks the vector layer) and loads the one the CPU's flags allow. The NEON layer is verified under
 * emulation only (tests/test_nf4_neon.py: qemu-aarch64).
 *
 * Built at first use by impls/kernels/nf4_native.py (cached by source hash) and called on tensors' data pointers
 * through ctypes or by the compiled few-rows op (nf4_op.cpp); both check shapes, dtypes and contiguity first.
 * Weight layout, as bnb stores it: packed uint8 [N, K/2] row-major, the high nibble of a byte is the even column;
 * fp32 scales [N * K / bs] (one per block of bs consecutive elements; bs a power of two >= 32 dividing K).
 *
 * The lookup: the 16-entry NF4 code lives in registers and a vector of 4-bit indices is looked up in one
 * instruction (AVX-512 vpermps; AVX2 two vpermps over the two 8-entry halves + a blend on index bit 3; NEON a
 * byte table lookup, tbl over the table's 64 bytes), so W is never written out by the GEMV kernels.
 *
 * GEMV layout (docs/quant_linear.md, "GEMV kernel"): a *group* is one vector load of packed bytes, 4L bytes =
 * 8L columns (L = floats per vector: 16, 8 or 4). Its dword i holds the 8 nibbles of columns 8i..8i+7; shifting
 * the whole vector right by 4s puts nibble s of every dword in the index bits, so 8 shifts + 8 lookups decode
 * the group with no byte-to-dword widening; nibble s is column 8i + (s ^ 1) (high nibble = even column). x is
 * put in that order once per call (and dx put back), so the weight is read once, in memory order.
 *
 * Compile with -ffp-contract=off: the dequantised values must be the plain fp32 product code * absmax
 * (bit-identical to bnb and the reference), not a fused multiply-add.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime, for the NF4_TRACE build */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

typedef int64_t i64;
#define AI static inline __attribute__((always_inline))

/* NF4_TRACE=1 builds record when each thread of the last whole-call kernel reached each phase, by the clock
 * (CLOCK_MONOTONIC ns) and by the thread's CPU time (CLOCK_THREAD_CPUTIME_ID ns: on a shared machine the time
 * a thread was descheduled is left out, its memory stalls are not); benchmarks/nf4_stream.py --trace reads them
 * through nf4_trace: where the time of a call goes between the fork, the phases, the barrier and the join.
 * Off (no code) in the normal build. */
#ifndef NF4_TRACE
#define NF4_TRACE 0
#endif
#define TRACE_THREADS 8
enum { TRACE_ENTRY, TRACE_FORKED, TRACE_PHASE1, TRACE_BARRIER, TRACE_DONE, TRACE_JOINED, TRACE_POINTS };
#if NF4_TRACE
#include <time.h>
static i64 trace_ns[TRACE_THREADS][TRACE_POINTS][2]; /* [thread][point][clock, thread CPU time] */
static void trace(int point) {
    struct timespec t, c;
    clock_gettime(CLOCK_MONOTONIC, &t);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c);
    const int thread = omp_get_thread_num();
    if (thread < TRACE_THREADS) {
        trace_ns[thread][point][0] = (i64)t.tv_sec * 1000000000 + t.tv_nsec;
        trace_ns[thread][point][1] = (i64)c.tv_sec * 1000000000 + c.tv_nsec;
    }
}
#else
static inline void trace(int point) { (void)point; }
#endif

#define MAX_ROWS 4 /* rows of x handled by one GEMV call (Python splits larger batches; the dispatch sends
                        * at most 4 rows to the GEMV: each count is a specialisation, i.e. compile time) */

/* ---- the vector layer: L floats per vector ------------------------------------------------------------- */
#if defined(__AVX512F__)
#define NF4_ISA 512
#define L 16
typedef __m512 vf;
typedef __m512i vi;
typedef struct { __m512 t; } lut_t;
AI lut_t lut_load(const float *c) { lut_t l = {_mm512_loadu_ps(c)}; return l; }
AI vf vload(const float *p) { return _mm512_loadu_ps(p); }
AI void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
AI vf vzero(void) { return _mm512_setzero_ps(); }
AI vf vset1(float f) { return _mm512_set1_ps(f); }
AI vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
AI vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
AI vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
AI float vsum(vf v) { return _mm512_reduce_add_ps(v); }
AI vi group_load(const uint8_t *p) { return _mm512_loadu_si512((const void *)p); }
/* L bf16 values -> fp32 (exact) */
AI vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* p[0], p[8], ..., p[8 (L - 1)] */
AI vf gather_stride8(const float *p) {
    return _mm512_i32gather_ps(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120), p, 4);
}
/* dwords at p[0], p[8], ..., p[8 (L - 1)] (bf16 elements: lane i holds p[8i] low, p[8i + 1] high) */
AI vi gather_bf16_pairs(const uint16_t *p) {
    return _mm512_i32gather_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60), p, 4);
}
AI vf pair_high(vi d) { return _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32((int)0xffff0000u))); }
AI vf pair_low(vi d) { return _mm512_castsi512_ps(_mm512_slli_epi32(d, 16)); }
/* L floats -> bf16, rounded to nearest even, NaN kept a (quiet) NaN: what torch's .to(torch.bfloat16) gives */
AI void vstore_bf16(uint16_t *p, vf v) {
    const __m512i b = _mm512_castps_si512(v), hi = _mm512_srli_epi32(b, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), hi, _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
/* code[index] for the 4-bit index in bits 0..3 of every dword (vpermps ignores the bits above) */
AI vf lookup(vi idx, lut_t lut) { return _mm512_permutexvar_ps(idx, lut.t); }
AI vi shift_right(vi v, const int bits) { return bits ? _mm512_srli_epi32(v, bits) : v; }
/* scales of lanes that span several blocks: lane i takes s[idx[i]], the first n entries of s loaded */
AI vf lane_scales(const float *s, int n, vi idx) {
    return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), s));
}
/* code2[q[0..15]]: 16 double-quantised scale bytes looked up in bnb's 256-entry map */
AI vf gather_code2(const uint8_t *q, const float *code2) {
    return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q)), code2, 4);
}
AI vi lane_index(int lanes_per_block) {
    int32_t t[16];
    for (int i = 0; i < 16; i++) t[i] = i / lanes_per_block;
    return _mm512_loadu_si512((const void *)t);
}

#elif defined(__AVX2__)
#define NF4_ISA 2
#define L 8
typedef __m256 vf;
typedef __m256i vi;
typedef struct { __m256 lo, hi; } lut_t;
AI lut_t lut_load(const float *c) { lut_t l = {_mm256_loadu_ps(c), _mm256_loadu_ps(c + 8)}; return l; }
AI vf vload(const float *p) { return _mm256_loadu_ps(p); }
AI void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
AI vf vzero(void) { return _mm256_setzero_ps(); }
AI vf vset1(float f) { return _mm256_set1_ps(f); }
AI vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
AI vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
AI vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
AI float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AI vi group_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
AI vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
AI vf gather_stride8(const float *p) { return _mm256_i32gather_ps(p, _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), 4); }
AI vi gather_bf16_pairs(const uint16_t *p) {
    return _mm256_i32gather_epi32((const int *)p, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), 4);
}
AI vf pair_high(vi d) { return _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32((int)0xffff0000u))); }
AI vf pair_low(vi d) { return _mm256_castsi256_ps(_mm256_slli_epi32(d, 16)); }
AI void vstore_bf16(uint16_t *p, vf v) {
    const __m256i b = _mm256_castps_si256(v), hi = _mm256_srli_epi32(b, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
/* code[index] for bits 0..3 of every dword: vpermps on each 8-entry half (it reads bits 0..2), index bit 3
 * (moved to the sign bit) picks the half */
AI vf lookup(vi idx, lut_t lut) {
    const vf lo = _mm256_permutevar8x32_ps(lut.lo, idx), hi = _mm256_permutevar8x32_ps(lut.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
AI vi shift_right(vi v, const int bits) { return bits ? _mm256_srli_epi32(v, bits) : v; }
AI vf lane_scales(const float *s, int n, vi idx) {
    const vi live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_permutevar8x32_ps(_mm256_maskload_ps(s, live), idx);
}
/* code2[q[0..7]] */
AI vf gather_code2(const uint8_t *q, const float *code2) {
    return _mm256_i32gather_ps(code2, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q)), 4);
}
AI vi lane_index(int lanes_per_block) {
    int32_t t[8];
    for (int i = 0; i < 8; i++) t[i] = i / lanes_per_block;
    return _mm256_loadu_si256((const __m256i *)t);
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
/* NEON (128-bit, L = 4): the same group layout as the x86 layers (a group is 16 bytes = 32 columns), so every
 * block size the kernels take (bs >= 32 = 8L) gives one scale per group (lane_scales is never reached). Verified
 * bitwise (dequantisation) and to fp32 summation order (GEMV) under qemu-aarch64 only (tests/test_nf4_neon.py):
 * no speed claims. */
#define NF4_ISA 128
#define L 4
typedef float32x4_t vf;
typedef uint32x4_t vi;
typedef struct { uint8x16x4_t t; } lut_t; /* the 16 fp32 codes as 64 bytes, for tbl */
AI lut_t lut_load(const float *c) {
    const uint8_t *b = (const uint8_t *)c;
    lut_t l = {{{vld1q_u8(b), vld1q_u8(b + 16), vld1q_u8(b + 32), vld1q_u8(b + 48)}}};
    return l;
}
AI vf vload(const float *p) { return vld1q_f32(p); }
AI void vstore(float *p, vf v) { vst1q_f32(p, v); }
AI vf vzero(void) { return vdupq_n_f32(0.0f); }
AI vf vset1(float f) { return vdupq_n_f32(f); }
AI vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
AI vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
AI vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
AI float vsum(vf v) { return vaddvq_f32(v); }
AI vi group_load(const uint8_t *p) { return vreinterpretq_u32_u8(vld1q_u8(p)); }
AI vf vload_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
AI vf gather_stride8(const float *p) {
    vf v = vld1q_dup_f32(p);
    v = vld1q_lane_f32(p + 8, v, 1);
    v = vld1q_lane_f32(p + 16, v, 2);
    return vld1q_lane_f32(p + 24, v, 3);
}
AI vi gather_bf16_pairs(const uint16_t *p) {
    uint32_t t[4];
    for (int i = 0; i < 4; i++) memcpy(t + i, p + 8 * i, 4); /* p is only 2-byte aligned */
    return vld1q_u32(t);
}
AI vf pair_high(vi d) { return vreinterpretq_f32_u32(vandq_u32(d, vdupq_n_u32(0xffff0000u))); }
AI vf pair_low(vi d) { return vreinterpretq_f32_u32(vshlq_n_u32(d, 16)); }
AI void vstore_bf16(uint16_t *p, vf v) {
    const uint32x4_t b = vreinterpretq_u32_f32(v), hi = vshrq_n_u32(b, 16);
    const uint32x4_t lsb = vandq_u32(hi, vdupq_n_u32(1));
    const uint32x4_t r = vshrq_n_u32(vaddq_u32(b, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
    /* vceqq_f32(v, v): all ones where v is not NaN */
    vst1_u16(p, vmovn_u32(vbslq_u32(vceqq_f32(v, v), r, vorrq_u32(hi, vdupq_n_u32(0x40)))));
}
/* code[index] for bits 0..3 of every dword: the dword's 4 table bytes 4n..4n+3 as tbl indices, i.e.
 * n * 0x04040404 + 0x03020100 (no carries: 4n + 3 <= 63), looked up in the 64-byte table (bit-exact: bytes) */
AI vf lookup(vi idx, lut_t lut) {
    const vi bytes = vmlaq_n_u32(vdupq_n_u32(0x03020100u), vandq_u32(idx, vdupq_n_u32(15)), 0x04040404u);
    return vreinterpretq_f32_u8(vqtbl4q_u8(lut.t, vreinterpretq_u8_u32(bytes)));
}
/* a register shift (ushl by -bits): the count need not be a compile-time constant */
AI vi shift_right(vi v, const int bits) { return bits ? vshlq_u32(v, vdupq_n_s32(-bits)) : v; }
AI vf lane_scales(const float *s, int n, vi idx) {
    uint32_t i[4];
    float t[4];
    vst1q_u32(i, idx);
    for (int j = 0; j < 4; j++) t[j] = i[j] < (uint32_t)n ? s[i[j]] : 0.0f;
    return vld1q_f32(t);
}
/* code2[q[0..3]] */
AI vf gather_code2(const uint8_t *q, const float *code2) {
    const float t[4] = {code2[q[0]], code2[q[1]], code2[q[2]], code2[q[3]]};
    return vld1q_f32(t);
}
AI vi lane_index(int lanes_per_block) {
    uint32_t t[4];
    for (int i = 0; i < 4; i++) t[i] = (uint32_t)(i / lanes_per_block);
    return vld1q_u32(t);
}
#else
#error "nf4_native.c needs AVX-512F, AVX2 (+FMA, F16C) or aarch64 NEON"
#endif

/* What the vector layer leaves to the target: a spin-wait hint, a prefetch into L2 (NF4_PF_HINT: the x86 hint;
 * __builtin_prefetch locality 2 is aarch64's PLDL2KEEP), the asm constraint of a vector register and the fence
 * after non-temporal stores (x86 only: the NEON layer does not stream). */
#if L == 4
#define cpu_relax() __asm__ __volatile__("yield")
#define prefetch_l2(p) __builtin_prefetch((p), 0, 2)
#define VREG "+w"
#define store_fence() ((void)0)
#else
#define cpu_relax() _mm_pause()
#ifndef NF4_PF_HINT
#define NF4_PF_HINT _MM_HINT_T1
#endif
#define prefetch_l2(p) _mm_prefetch((const char *)(p), NF4_PF_HINT)
#define VREG "+v"
#define store_fence() _mm_sfence()
#endif

#define GROUP_COLS (8 * L)
#define GROUP_BYTES (4 * L)

/* The double-quantised scales' lookup code2[q] with AVX512-VBMI byte permutes (docs/quant_linear.md, "Scale
 * decode"): 64 scale bytes at a time, each of the four bytes of the fp32 entries looked up in its own 256-byte
 * plane (two two-table vpermi2b for entries 0..127 and 128..255, picked by index bit 7), then interleaved back
 * into floats: ~22 vector uops per 64 scales, exactly the table's values. On the Ice Lake VM the vgatherdps it
 * replaces took 30 cycles per 16 lanes (CPUs with the Gather Data Sampling microcode fix run gathers slowly) and
 * the scale decode ~20% of the one-row forward. Built for that target, taken where the CPU has VBMI
 * (__builtin_cpu_supports; Ice Lake and later, Zen 4); NF4_CODE2_VBMI=0 builds without it. */
#ifndef NF4_CODE2_VBMI
#define NF4_CODE2_VBMI 1
#endif
#if L == 16 && NF4_CODE2_VBMI && ((defined(__clang__) && __clang_major__ >= 8) || (!defined(__clang__) && __GNUC__ >= 8))
#define CODE2_PLANES 1
typedef struct {
    __m512i plane[4][4]; /* plane[k][h]: byte k of code2[64 h .. 64 h + 63] */
    __m512i order;       /* the byte order of 64 indices that the unpacks below turn back into natural order */
} code2_planes_t;
#else
#define CODE2_PLANES 0
#endif

/* What every GEMV kernel needs about the weight. Blocks narrower than a group (bs < 8L) give the lanes of a
 * group different scales (lane_scales); wider ones one scale per group (a broadcast). */
typedef struct {
    i64 N, K, bs, nb, half, groups, tail_cols;
    int bs_log2; /* bs = 1 << bs_log2: block indices by a shift, not a 64-bit division per group */
    int lanes_vary, scales_per_group;
    vi lane_idx;
    lut_t lut;
    const float *code;
    /* the block scales: fp32 (`scales`), or bnb's double-quantised state (q != NULL), decoded per row as the
     * kernels reach it (block_scale), never in a pass of its own */
    const float *scales;
    const uint8_t *q;
    const float *absmax2, *code2;
    float offset;
#if CODE2_PLANES
    code2_planes_t planes; /* code2 split into byte planes, for decode_scales_vbmi (used when planes_ok) */
    int planes_ok;
#endif
    const uint8_t *packed;   /* [N, K/2] */
    const struct lora *lora; /* the few-rows call's LoRA/bias epilogue (nf4_lora_gemv), or NULL */
} plan_t;

/* The LoRA factors and bias of a whole few-rows call, all fp32 and contiguous (docs/quant_linear.md, "GEMV
 * kernel", the whole call): out = x W^T + scaling (x A^T) B^T + bias, and its gradients, inside the kernels'
 * one OpenMP region instead of torch ops around them. Each element is summed by one thread in a fixed order,
 * so the results are bitwise the same at any thread count (tested). */
typedef struct lora {
    i64 rank;
    const void *a, *b; /* A [rank, K], B [N, rank]: fp32, or bf16 when ab_bf16 (read as is, no fp32 copies) */
    int ab_bf16;
    const float *bias;  /* [N], or NULL */
    float scaling;
    float *xa;          /* x A^T [M, rank]: written by the forward, read by the backward */
    /* backward only: x [M, K] (natural order), and the LoRA gradients written (NULL: not wanted) */
    const float *x;
    void *da, *db;      /* dA [rank, K], dB [N, rank], in A's and B's dtype (computed in fp32, rounded once) */
} lora_t;

/* bf16 <-> fp32 for the LoRA factors: widening is exact; narrowing rounds to nearest even, NaN stays NaN (as
 * torch's .to(torch.bfloat16)). */
AI float bf16_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
AI uint16_t f32_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (f != f) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}
/* &t[i] of a LoRA tensor */
AI const void *lora_row(const void *t, int bf16, i64 i) {
    return bf16 ? (const void *)((const uint16_t *)t + i) : (const void *)((const float *)t + i);
}
/* element i / the L elements from i of a LoRA tensor (fp32, or bf16 when bf16) */
AI float at_any(const void *t, int bf16, i64 i) { return bf16 ? bf16_f32(((const uint16_t *)t)[i]) : ((const float *)t)[i]; }
AI vf load_any(const void *t, int bf16, i64 i) {
    return bf16 ? vload_bf16((const uint16_t *)t + i) : vload((const float *)t + i);
}
AI void put_any(void *t, int bf16, i64 i, float f) {
    if (bf16) ((uint16_t *)t)[i] = f32_bf16(f);
    else ((float *)t)[i] = f;
}
AI void store_any(void *t, int bf16, i64 i, vf v) {
    if (!bf16) {
        vstore((float *)t + i, v);
        return;
    }
    vstore_bf16((uint16_t *)t + i, v);
}

#define MAX_RANK 256 /* LoRA rank the whole-call kernels take (Python routes larger ones to torch) */

#ifndef NF4_VECTOR_SCALES
#define NF4_VECTOR_SCALES 1
#endif
#define MAX_ROW_BLOCKS 2048 /* blocks per row the per-row scale buffers hold (K / bs) */

static int make_plan(plan_t *p, const float *code16, i64 N, i64 K, i64 bs) {
    if (N < 1 || bs < 32 || (bs & (bs - 1)) || K % bs || K / bs > MAX_ROW_BLOCKS) return -1;
    p->N = N, p->K = K, p->bs = bs, p->nb = K / bs, p->half = K / 2;
    p->bs_log2 = __builtin_ctzll((unsigned long long)bs);
    p->groups = K / GROUP_COLS;
    p->tail_cols = K - p->groups * GROUP_COLS; /* only when bs < 8L: whole blocks, done in scalar code */
    p->lanes_vary = bs < GROUP_COLS;
    p->scales_per_group = p->lanes_vary ? (int)(GROUP_COLS / bs) : 1;
    p->lane_idx = lane_index(p->lanes_vary ? (int)(bs / 8) : L);
    p->lut = lut_load(code16);
    p->code = code16;
    p->lora = NULL;
    return 0;
}

/* Double-quantised: code2[q[i]] * absmax2[i / 256] + offset, two fp32 roundings (no FMA: -ffp-contract=off), as
 * bnb and nf4_decode_absmax compute it. */
AI float block_scale(const plan_t *p, i64 i) {
    return p->q ? p->code2[p->q[i]] * p->absmax2[i / 256] + p->offset : p->scales[i];
}

#if CODE2_PLANES
static void make_code2_planes(code2_planes_t *t, const float *code2) {
    uint8_t bytes[4][256], order[64];
    for (int j = 0; j < 256; j++) {
        uint32_t u;
        memcpy(&u, code2 + j, 4);
        for (int k = 0; k < 4; k++) bytes[k][j] = (uint8_t)(u >> (8 * k));
    }
    for (int k = 0; k < 4; k++)
        for (int h = 0; h < 4; h++) t->plane[k][h] = _mm512_loadu_si512((const void *)(bytes[k] + 64 * h));
    /* unpacking bytes, then words, works within 128-bit lanes: output vector v's lane c holds the entries that
     * sit at 16 c + 4 v .. + 3 of the (reordered) input, which must be indices 16 v + 4 c .. + 3 */
    for (int c = 0; c < 4; c++)
        for (int v = 0; v < 4; v++)
            for (int u = 0; u < 4; u++) order[16 * c + 4 * v + u] = (uint8_t)(16 * v + 4 * c + u);
    t->order = _mm512_loadu_si512((const void *)order);
}

/* buf[0 .. count) = the scales of blocks i0 .. i0 + count: code2[q] (the byte planes) * absmax2 + offset,
 * the same two roundings as block_scale. Reads no q byte past i0 + count (masked loads) and no absmax2 entry
 * past the last block's (tests/test_nf4_native.py, guard pages). */
__attribute__((target("avx512vbmi,avx512f,avx512bw,avx512vl,fma"), noinline))
static void decode_scales_vbmi(const plan_t *p, i64 i0, i64 count, float *buf) {
    const code2_planes_t *t = &p->planes;
    for (i64 c = 0; c < count; c += 64) {
        const i64 n = count - c < 64 ? count - c : 64;
        const __mmask64 valid = n == 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
        const __m512i idx = _mm512_permutexvar_epi8(t->order, _mm512_maskz_loadu_epi8(valid, p->q + i0 + c));
        const __mmask64 upper = _mm512_movepi8_mask(idx); /* index bit 7: entries 128..255 */
        __m512i b[4];
        for (int k = 0; k < 4; k++)
            b[k] = _mm512_mask_mov_epi8(_mm512_permutex2var_epi8(t->plane[k][0], idx, t->plane[k][1]), upper,
                                        _mm512_permutex2var_epi8(t->plane[k][2], idx, t->plane[k][3]));
        const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
        const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
        const __m512i codes[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                                  _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
        for (int v = 0; v < 4 && 16 * v < n; v++) {
            const i64 i = i0 + c + 16 * v, lanes = n - 16 * v < 16 ? n - 16 * v : 16;
            __m512 amax2 = _mm512_set1_ps(p->absmax2[i / 256]);
            if ((i & 255) + lanes > 256) /* its blocks cross into the next absmax2 entry: those lanes take that */
                amax2 = _mm512_mask_mov_ps(amax2, (__mmask16)(0xffffu << (256 - (i & 255))),
                                           _mm512_set1_ps(p->absmax2[i / 256 + 1]));
            const __m512 sc = _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(codes[v]), amax2),
                                            _mm512_set1_ps(p->offset));
            _mm512_mask_storeu_ps(buf + c + 16 * v, (__mmask16)((1u << lanes) - 1), sc);
        }
    }
}
#endif

/* The scales of row n's blocks [b0, b1): the fp32 array itself, or decoded into buf (indexed from block 0). */
AI const float *row_scales(const plan_t *p, i64 n, i64 b0, i64 b1, float *buf) {
    if (!p->q) return p->scales + n * p->nb;
#if CODE2_PLANES
    if (p->planes_ok) {
        decode_scales_vbmi(p, n * p->nb + b0, b1 - b0, buf + b0);
        return buf;
    }
#endif
    i64 b = b0;
#if NF4_VECTOR_SCALES
    /* L blocks at a time while they share one absmax2 entry: a gather from code2, then the same multiply and
     * add as block_scale (bit-identical, tested). One scalar decode per block cost 10-20% of the GEMV's time
     * (docs/quant_linear.md, "GEMV kernel"). Scalar across a 256-block boundary and at the end. */
    for (; b + L <= b1; b += L) {
        const i64 i = n * p->nb + b;
        if ((i & 255) + L > 256) {
            for (int j = 0; j < L; j++) buf[b + j] = block_scale(p, i + j);
            continue;
        }
        vstore(buf + b, vadd(vmul(gather_code2(p->q + i, p->code2), vset1(p->absmax2[i / 256])), vset1(p->offset)));
    }
#endif
    for (; b < b1; b++) buf[b] = block_scale(p, n * p->nb + b);
    return buf;
}

static int set_scales(plan_t *p, const float *scales, const uint8_t *q, const float *absmax2, const float *code2,
                      float offset) {
    p->scales = scales, p->q = q, p->absmax2 = absmax2, p->code2 = code2, p->offset = offset;
#if CODE2_PLANES
    p->planes_ok = q != NULL && code2 != NULL && __builtin_cpu_supports("avx512vbmi");
    if (p->planes_ok) make_code2_planes(&p->planes, code2);
#endif
    const int fp32 = scales != NULL, nested = q != NULL && absmax2 != NULL && code2 != NULL;
    return fp32 != nested ? 0 : -1; /* exactly one form */
}

AI vf group_scale(const plan_t *p, const float *srow, i64 g) {
    const i64 first = (g * GROUP_COLS) >> p->bs_log2;
    return p->lanes_vary ? lane_scales(srow + first, p->scales_per_group, p->lane_idx) : vset1(srow[first]);
}

/* Nibble s (0..7) of every dword of a group: shifting the group by 8k bits is a load at k bytes further instead
 * (the load ports have room; the shift, lookup and FMA ports are the bottleneck): 4 shifts per group instead of
 * 7, in the forward and the one-row backward (docs/quant_linear.md, "GEMV kernel"). Such a load reads up to 3
 * bytes past the group: the array's last row shifts instead (tested with a guard page). NF4_OFFSET_LOADS=0:
 * the forward shifts only. */
#ifndef NF4_OFFSET_LOADS
#define NF4_OFFSET_LOADS 1
#endif
/* the forward's offset loads at every byte k = 0..3 (1), or at k = 0, 2 only (2: 6 shifts, 1 split load; the
 * same speed, measured), or none (4) */
#ifndef NF4_FWD_OFFSET_STEP
#define NF4_FWD_OFFSET_STEP 1
#endif
#ifndef NF4_LOAD_ONCE
#define NF4_LOAD_ONCE 1
#endif
/* An offset load, kept in a register: without the empty asm GCC folds the load into the odd nibble's shift
 * (vpsrld $4, mem), i.e. loads each offset twice, both loads split across two cache lines (the backward was
 * slower with offset loads than with shifts because of it; NF4_LOAD_ONCE=0 builds the folding, to compare). */
AI vi offset_load(const uint8_t *p) {
    vi v = group_load(p);
#if NF4_LOAD_ONCE
    __asm__("" : VREG(v));
#endif
    return v;
}

/* Software prefetch (docs/quant_linear.md, "GEMV kernel"). Without it the kernel's decoding and its DRAM reads
 * did not overlap: cache-hot it decodes at ~10 GB/s of stored weight, streaming from DRAM it reached ~7
 * (too few misses in flight). Each group load fetches the same offset of the rows the *next pass* reads
 * (pass_bytes ahead): rows of 2-7 KB are short streams (in the backward each thread reads only its columns,
 * shorter still), so the hardware prefetcher, which stops at 4 KB pages and restarts per stream, falls behind;
 * one pass ahead is 8-28 KB per stream, which sits in L2. Measured against prefetching 256 B-2 KB ahead in
 * the same row (10-25% slower), two passes ahead (same) and the T0/T2/NTA hints (T0 same, T2 and NTA slower;
 * on Ice Lake, benchmarks/nf4_decode.py with -DNF4_PF_HINT=..., streamed, one thread: T0 and T2 within 3% of T1,
 * no prefetch 1.10x the forward's cycles and 1.07x the backward's).
 * NF4_PREFETCH=0 builds without it (benchmarks/nf4_stream.py compares). */
#ifndef NF4_PREFETCH
#define NF4_PREFETCH 1
#endif
/* at: the group about to be read; pass_bytes: how far ahead the next pass reads it. Once per cache line. */
AI void prefetch_ahead(const uint8_t *at, i64 g, i64 pass_bytes) {
    if (!NF4_PREFETCH || (GROUP_BYTES < 64 && (g & (64 / GROUP_BYTES - 1)))) return;
    prefetch_l2(at + pass_bytes);
}

/* The double-quantised scale bytes of rows [row, row + rows), blocks [b0, b1): a line or a few per row, read at
 * the start of each pass, so fetched one pass ahead like the weight. */
AI void prefetch_scales(const plan_t *p, i64 row, int rows, i64 b0, i64 b1) {
    if (!NF4_PREFETCH || !p->q) return;
    for (int r = 0; r < rows && row + r < p->N; r++) {
        const char *at = (const char *)(p->q + (row + r) * p->nb);
        for (i64 b = b0; b < b1; b += 64) prefetch_l2(at + b);
        prefetch_l2(at + b1 - 1);
    }
}

/* natural column of position j (0 <= j < 8L) of a group laid out as 8 vectors (nibble s) of L lanes (dword i) */
AI i64 natural_col(i64 j) { return 8 * (j % L) + ((j / L) ^ 1); }

static inline void thread_range(i64 total, i64 align, i64 *lo, i64 *hi) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const i64 units = (total + align - 1) / align;
    *lo = units * t / nt * align;
    *hi = units * (t + 1) / nt * align;
    if (*lo > total) *lo = total;
    if (*hi > total) *hi = total;
}

/* x [M, K] (fp32, or bf16 when x_bf16) -> xs [M, K] fp32 in group order (the scalar tail stays natural). Vector s
 * of a group holds natural columns 8i + (s ^ 1): fp32, a stride-8 gather each; bf16, one dword gather at
 * columns 8i + s (s even) serves vectors s (its high halves: column 8i + s + 1) and s + 1 (its low halves), each
 * widened exactly by a mask or a shift (NF4_BF16_GATHER=0: one element at a time, as before, to compare). */
#ifndef NF4_BF16_GATHER
#define NF4_BF16_GATHER 1
#endif
static void to_group_order(const void *x, int x_bf16, float *xs, const plan_t *p, i64 M, i64 g0, i64 g1) {
    for (i64 m = 0; m < M; m++)
        for (i64 g = g0; g < g1; g++) {
            float *dst = xs + m * p->K + g * GROUP_COLS;
            if (!x_bf16) {
                const float *src = (const float *)x + m * p->K + g * GROUP_COLS;
                for (int s = 0; s < 8; s++) vstore(dst + s * L, gather_stride8(src + (s ^ 1)));
                continue;
            }
            const uint16_t *src = (const uint16_t *)x + m * p->K + g * GROUP_COLS;
            if (NF4_BF16_GATHER) {
                for (int s = 0; s < 8; s += 2) {
                    const vi d = gather_bf16_pairs(src + s);
                    vstore(dst + s * L, pair_high(d));
                    vstore(dst + (s + 1) * L, pair_low(d));
                }
                continue;
            }
            for (i64 j = 0; j < GROUP_COLS; j++) {
                const uint32_t bits = (uint32_t)src[natural_col(j)] << 16;
                memcpy(dst + j, &bits, 4);
            }
        }
}

static void tail_to_fp32(const void *x, int x_bf16, float *xs, const plan_t *p, i64 M) {
    for (i64 m = 0; m < M; m++)
        for (i64 k = p->groups * GROUP_COLS; k < p->K; k++) {
            float v;
            if (x_bf16) {
                uint32_t bits = (uint32_t)((const uint16_t *)x)[m * p->K + k] << 16;
                memcpy(&v, &bits, 4);
            } else {
                v = ((const float *)x)[m * p->K + k];
            }
            xs[m * p->K + k] = v;
        }
}

AI float code_of(const plan_t *p, const uint8_t *row, i64 k) {
    const uint8_t b = row[k / 2];
    return p->code[(k & 1) ? (b & 15) : (b >> 4)];
}

/* Per-call scratch of the calling thread, grown as needed and kept (ctypes releases the GIL: two Python
 * threads may call at once, so it is thread-local, never shared). */
static _Thread_local float *scratch_buf;
static _Thread_local i64 scratch_len;

static float *scratch(i64 floats) {
    if (floats > scratch_len) {
        free(scratch_buf);
        scratch_buf = aligned_alloc(64, (size_t)((floats + 15) / 16 * 16) * sizeof(float));
        scratch_len = scratch_buf ? floats : 0;
    }
    return scratch_buf;
}

/* sum_i a[i] b[i] (b fp32, or bf16 when b_bf16), four vector partial sums (L lanes each) then a scalar tail: a fixed order for a given n */
static float dot(const float *a, const void *b, int b_bf16, i64 n) {
    vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
    i64 i = 0;
    for (; i + 4 * L <= n; i += 4 * L) {
        s0 = vfma(vload(a + i), load_any(b, b_bf16, i), s0);
        s1 = vfma(vload(a + i + L), load_any(b, b_bf16, i + L), s1);
        s2 = vfma(vload(a + i + 2 * L), load_any(b, b_bf16, i + 2 * L), s2);
        s3 = vfma(vload(a + i + 3 * L), load_any(b, b_bf16, i + 3 * L), s3);
    }
    for (; i + L <= n; i += L) s0 = vfma(vload(a + i), load_any(b, b_bf16, i), s0);
    float total = vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
    for (; i < n; i++) total += a[i] * at_any(b, b_bf16, i);
    return total;
}

/* The forward's output element [m, n] from the GEMV's sum: + scaling (x A^T)[m] . B[n] (as torch's
 * out.addmm_(xa, B^T, alpha=scaling): the product, scaled, then added), then + bias[n]. */
AI float lora_out(const plan_t *p, int m, i64 n, float total) {
    const lora_t *lo = p->lora;
    if (!lo) return total;
    float out = total;
    if (lo->rank) out = total + lo->scaling * dot(lo->xa + m * lo->rank, lora_row(lo->b, lo->ab_bf16, n * lo->rank), lo->ab_bf16, lo->rank);
    return lo->bias ? out + lo->bias[n] : out;
}

/* ---- forward: y[m, n] = sum_k x[m, k] W[n, k] ------------------------------------------------------------- */

/* How the one-row kernels form a group's per-lane scale vector when a group spans two blocks (bs = 64 in the
 * AVX-512 build, QLoRA's blocksize): 1 = a broadcast of the first block's scale and a masked broadcast of the
 * second's into lanes 8..15 (load ports + one p0/p5 uop; 10% faster forward, 16% backward, measured);
 * 0 = lane_scales (a masked load + vpermps on p5). */
#ifndef NF4_FWD_SCALES
#define NF4_FWD_SCALES 1
#endif
/* partial sums per row of W and x in the forward's group loop (1 or 2: the same speed within the noise,
 * measured; 2 keeps the summation order, i.e. the results, of the kernel before) */
#ifndef NF4_FWD_CHAINS
#define NF4_FWD_CHAINS 2
#endif
/* rows of W per block in the one-row forward (AVX-512 build): 2, 4 and 6 the same speed within the noise */
#ifndef NF4_FWD_RB1
#define NF4_FWD_RB1 4
#endif

/* rows of W per block in the 4-row forward (AVX-512 build): 2, so each x vector is loaded once per two rows of W
 * (half the x loads; 4 rows of x are 64 KB at K = 4096, more than L1 holds): 1.3x faster than 1 (measured,
 * docs/quant_linear.md). 3 rows gained 5% from it, not worth its compile time. */
#ifndef NF4_FWD_RB4
#define NF4_FWD_RB4 2
#endif
#define MAX_RB (NF4_FWD_RB1 > 4 ? NF4_FWD_RB1 : 4) /* rows of W per forward block, at most */

/* How a group's scales vary over its lanes, a compile-time argument of the kernels: SCALES_TWO, two blocks per
 * group (bs = 4L: lanes 0..L/2-1 and L/2..L-1, QLoRA's bs 64 in the AVX-512 build), for 1 to NF4_TWO_SCALES_ROWS
 * rows of x (forward and backward); SCALES_ANY, any bs, chosen per group (group_scale). Each specialisation
 * costs compile time (~+0.5-1 s each in every fresh AVX-512 build the tests make): 2 and 3 rows (2026-12-06,
 * measured 4096x4096, forward 2 rows 7% faster, 3 rows 18-24%, backward 2 rows 16%, 3 rows 5%; the build
 * ~+0.4-1.3 s) pay for it, 4 rows does not (its kernel takes 2 rows of W per pass; within the noise, +1.5-2.5 s
 * of build: NF4_TWO_SCALES_ROWS=4 to compare). */
#ifndef NF4_TWO_SCALES_ROWS
#define NF4_TWO_SCALES_ROWS 3
#endif
enum { SCALES_ANY, SCALES_TWO };

AI vf group_scale_k(const plan_t *p, const float *srow, i64 g, const int kind) {
#if L == 16 && NF4_FWD_SCALES
    if (kind == SCALES_TWO) return _mm512_mask_broadcastss_ps(vset1(srow[2 * g]), 0xff00, _mm_load_ss(srow + 2 * g + 1));
#endif
    (void)kind;
    return group_scale(p, srow, g);
}

/* the scale layout the kernels for R rows of x are specialised for */
AI int scales_kind(const plan_t *p, const int R) {
    return L == 16 && NF4_FWD_SCALES && R <= NF4_TWO_SCALES_ROWS && p->scales_per_group == 2 ? SCALES_TWO : SCALES_ANY;
}

/* RB rows of W from n, R rows of x: each group is loaded once per W row and each decoded vector used for R
 * rows of x; each x vector for RB rows of W. NF4_FWD_CHAINS partial sums per pair (one: no add per group; the
 * RB pairs' chains are independent); each group's partial sum is scaled once. */
AI void fwd_block(const plan_t *p, const uint8_t *packed, const float *xs, float *y, i64 n, const int R,
                  const int RB, const int safe, const int kind) {
    vf acc[MAX_RB][MAX_ROWS];
    for (int rb = 0; rb < RB; rb++)
        for (int m = 0; m < R; m++) acc[rb][m] = vzero();
    const uint8_t *rows[MAX_RB];
    const float *srows[MAX_RB];
    float decoded[MAX_RB][MAX_ROW_BLOCKS];
    prefetch_scales(p, n + RB, RB, 0, p->nb);
    for (int rb = 0; rb < RB; rb++)
        rows[rb] = packed + (n + rb) * p->half, srows[rb] = row_scales(p, n + rb, 0, p->nb, decoded[rb]);
    for (i64 g = 0; g < p->groups; g++) {
        vi v[MAX_RB];
        for (int rb = 0; rb < RB; rb++) prefetch_ahead(rows[rb] + g * GROUP_BYTES, g, RB * p->half);
        for (int rb = 0; rb < RB; rb++) v[rb] = group_load(rows[rb] + g * GROUP_BYTES);
        vf part[MAX_RB][MAX_ROWS][2];
        for (int rb = 0; rb < RB; rb++)
            for (int m = 0; m < R; m++) part[rb][m][0] = part[rb][m][1] = vzero();
        const float *xg = xs + g * GROUP_COLS;
        vi cur[MAX_RB]; /* the offset load of nibbles s and s + 1 (s even) */
#pragma GCC unroll 8
        for (int s = 0; s < 8; s++) {
            vf w[MAX_RB];
            for (int rb = 0; rb < RB; rb++) {
                if (safe || !NF4_OFFSET_LOADS) {
                    w[rb] = lookup(shift_right(v[rb], 4 * s), p->lut);
                    continue;
                }
                const int k = s / 2 / NF4_FWD_OFFSET_STEP * NF4_FWD_OFFSET_STEP; /* the load: at byte k */
                if (2 * k == s) cur[rb] = k ? offset_load(rows[rb] + g * GROUP_BYTES + k) : v[rb];
                w[rb] = lookup(shift_right(cur[rb], 4 * s - 8 * k), p->lut);
            }
            for (int m = 0; m < R; m++) {
                const vf xv = vload(xg + m * p->K + s * L);
                for (int rb = 0; rb < RB; rb++) {
                    const int c = NF4_FWD_CHAINS == 2 ? (s & 1) : 0;
                    part[rb][m][c] = s < NF4_FWD_CHAINS ? vmul(w[rb], xv) : vfma(w[rb], xv, part[rb][m][c]);
                }
            }
        }
        for (int rb = 0; rb < RB; rb++) {
            const vf sc = group_scale_k(p, srows[rb], g, kind);
            for (int m = 0; m < R; m++)
                acc[rb][m] = vfma(NF4_FWD_CHAINS == 2 ? vadd(part[rb][m][0], part[rb][m][1]) : part[rb][m][0], sc,
                                  acc[rb][m]);
        }
    }
    for (int rb = 0; rb < RB; rb++)
        for (int m = 0; m < R; m++) {
            float total = vsum(acc[rb][m]);
            for (i64 b = p->groups * GROUP_COLS / p->bs; b < p->nb; b++) { /* tail blocks (bs < 8L only) */
                float part = 0.0f;
                for (i64 k = b * p->bs; k < (b + 1) * p->bs; k++) part += xs[m * p->K + k] * code_of(p, rows[rb], k);
                total += part * srows[rb][b];
            }
            y[m * p->N + n + rb] = total; /* the LoRA/bias epilogue follows per chunk (gemv_call) */
        }
}

AI void fwd_rows_k(const plan_t *p, const uint8_t *packed, const float *xs, float *y, i64 n0, i64 n1, const int R,
                   const int RB, const int kind) {
    const i64 last = n1 == p->N ? n1 - 1 : n1; /* the array's last row: no reads past its end */
    i64 n = n0;
    for (; n + RB <= last; n += RB) fwd_block(p, packed, xs, y, n, R, RB, 0, kind);
    for (; n < last; n++) fwd_block(p, packed, xs, y, n, R, 1, 0, kind);
    if (last < n1) fwd_block(p, packed, xs, y, last, R, 1, 1, kind);
}

AI void fwd_rows(const plan_t *p, const uint8_t *packed, const float *xs, float *y, i64 n0, i64 n1, const int R,
                 const int RB) {
    if (scales_kind(p, R) == SCALES_TWO) fwd_rows_k(p, packed, xs, y, n0, n1, R, RB, SCALES_TWO);
    else fwd_rows_k(p, packed, xs, y, n0, n1, R, RB, SCALES_ANY);
}

/* Rows of W handed out in chunks of STEAL_ROWS (a multiple of 16: no two threads write one cache line of y).
 * Each thread starts with an even, contiguous share of the chunks and takes them from its front, so a balanced
 * run reads each thread's rows in one stream as a static split would; a thread that runs out takes chunks from
 * the back of the others' shares. A thread that is descheduled, or slowed by a neighbour, then holds up the
 * call by at most one chunk instead of the rest of its share (docs/quant_linear.md, "GEMV kernel", threads). */
#define STEAL_ROWS 32
#define MAX_TEAM 64
#ifndef NF4_STEAL
#define NF4_STEAL 1 /* 0: each thread its own share only, a static split, forward and backward (benchmarks/nf4_stream.py
                     * --no-steal) */
#endif

/* one thread's chunks [front, back): front in the low 32 bits; a cache line each */
typedef struct { uint64_t span; char pad[56]; } share_t;

AI int take_front(share_t *s, i64 *chunk) {
    uint64_t cur = __atomic_load_n(&s->span, __ATOMIC_RELAXED);
    for (;;) {
        const uint64_t front = cur & 0xffffffffu, back = cur >> 32;
        if (front >= back) return 0;
        if (__atomic_compare_exchange_n(&s->span, &cur, cur + 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *chunk = (i64)front;
            return 1;
        }
    }
}

AI int take_back(share_t *s, i64 *chunk) {
    uint64_t cur = __atomic_load_n(&s->span, __ATOMIC_RELAXED);
    for (;;) {
        const uint64_t front = cur & 0xffffffffu, back = cur >> 32;
        if (front >= back) return 0;
        if (__atomic_compare_exchange_n(&s->span, &cur, cur - ((uint64_t)1 << 32), 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
            *chunk = (i64)back - 1;
            return 1;
        }
    }
}

/* rows [c * STEAL_ROWS, ...) of the forward (not inlined: it has two callers, and each copy of the kernels
 * costs compile time) */
static __attribute__((noinline)) void fwd_chunk(const plan_t *p, const float *xs, float *y, i64 M, i64 c) {
    const i64 n0 = c * STEAL_ROWS, n1 = n0 + STEAL_ROWS < p->N ? n0 + STEAL_ROWS : p->N;
    switch (M) { /* constant row counts: the accumulators stay in registers */
#if L == 16
    case 1: fwd_rows(p, p->packed, xs, y, n0, n1, 1, NF4_FWD_RB1); break;
    case 2: fwd_rows(p, p->packed, xs, y, n0, n1, 2, 2); break;
    case 3: fwd_rows(p, p->packed, xs, y, n0, n1, 3, 1); break;
    default: fwd_rows(p, p->packed, xs, y, n0, n1, 4, NF4_FWD_RB4); break;
#else
    case 1: fwd_rows(p, p->packed, xs, y, n0, n1, 1, 2); break;
    case 2: fwd_rows(p, p->packed, xs, y, n0, n1, 2, 1); break;
    case 3: fwd_rows(p, p->packed, xs, y, n0, n1, 3, 1); break;
    default: fwd_rows(p, p->packed, xs, y, n0, n1, 4, 1); break;
#endif
    }
}

/* the LoRA/bias epilogue of chunk c's rows (y holds their GEMV sums) */
static void epilogue_chunk(const plan_t *p, float *y, i64 M, i64 c) {
    const i64 n0 = c * STEAL_ROWS, n1 = n0 + STEAL_ROWS < p->N ? n0 + STEAL_ROWS : p->N;
    for (i64 m = 0; m < M; m++)
        for (i64 n = n0; n < n1; n++) y[m * p->N + n] = lora_out(p, (int)m, n, y[m * p->N + n]);
}

/* Chunks whose epilogue waits for x A^T (see gemv_call); past this many, the thread waits for it. */
#define MAX_PENDING 64

typedef struct {
    i64 next_j, done_j; /* LoRA rows of x A^T claimed / finished (atomics) */
} xa_progress_t;

AI int xa_ready(const plan_t *p, const xa_progress_t *xp) {
    return !p->lora || !p->lora->rank || __atomic_load_n(&xp->done_j, __ATOMIC_ACQUIRE) == p->lora->rank;
}

/* The forward: x into group order on the calling thread before the fork (a few us), then one OpenMP region with
 * no barrier: x A^T by LoRA rows claimed one at a time (each dot product whole, in a fixed order), then the rows
 * of W in chunks (above). A chunk's LoRA/bias epilogue needs the whole x A^T: it runs right after the chunk
 * once every row of x A^T is done, else after the thread's last chunk (then waiting for the thread still
 * computing one). No thread waits for another to start: a late thread finds the x A^T rows and the chunks
 * taken (docs/quant_linear.md, "GEMV kernel", threads). Every row of y is computed by one thread in the same
 * order whichever thread takes it, so the results do not depend on the thread count or the stealing. */
static int gemv_call(const plan_t *p, const void *x, int x_bf16, float *y, i64 M, int threads) {
    float *xs = scratch(M * p->K);
    if (!xs) return -2;
    trace(TRACE_ENTRY);
    tail_to_fp32(x, x_bf16, xs, p, M);
    to_group_order(x, x_bf16, xs, p, M, 0, p->groups);
    trace(TRACE_PHASE1);
    const lora_t *lo = p->lora;
    if (threads > MAX_TEAM) threads = MAX_TEAM;
    if (threads < 1) threads = 1;
    const i64 chunks = (p->N + STEAL_ROWS - 1) / STEAL_ROWS;
    share_t shares[MAX_TEAM] __attribute__((aligned(64)));
    for (int t = 0; t < threads; t++) /* set before the fork: a thief may look at any share at once */
        shares[t].span = ((uint64_t)(chunks * (t + 1) / threads) << 32) | (uint64_t)(chunks * t / threads);
    xa_progress_t xp = {0, 0};
#pragma omp parallel num_threads(threads)
    {
        trace(TRACE_FORKED);
        if (lo && lo->rank) { /* x is fp32 here (nf4_lora_gemv) */
            i64 j;
            while ((j = __atomic_fetch_add(&xp.next_j, 1, __ATOMIC_RELAXED)) < lo->rank) {
                for (i64 m = 0; m < M; m++)
                    lo->xa[m * lo->rank + j] = dot((const float *)x + m * p->K, lora_row(lo->a, lo->ab_bf16, j * p->K),
                                                   lo->ab_bf16, p->K);
                __atomic_fetch_add(&xp.done_j, 1, __ATOMIC_RELEASE);
            }
        }
        /* a team smaller than asked for (nested parallelism) leaves shares nobody owns: the others steal them */
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        i64 c, pending[MAX_PENDING];
        int npending = 0;
        for (int v = 0; v < threads; v++) {
            if (v && !NF4_STEAL && (me + v) % threads < team) continue; /* static split: unowned shares only */
            share_t *share = &shares[(me + v) % threads];
            while (v ? take_back(share, &c) : take_front(share, &c)) {
                fwd_chunk(p, xs, y, M, c);
                if (!lo) continue;
                if (npending == MAX_PENDING) /* rare: wait for x A^T */
                    while (!xa_ready(p, &xp)) cpu_relax();
                if (xa_ready(p, &xp)) {
                    for (; npending; npending--) epilogue_chunk(p, y, M, pending[npending - 1]);
                    epilogue_chunk(p, y, M, c);
                } else {
                    pending[npending++] = c;
                }
            }
        }
        if (npending) {
            while (!xa_ready(p, &xp)) cpu_relax();
            for (; npending; npending--) epilogue_chunk(p, y, M, pending[npending - 1]);
        }
        trace(TRACE_DONE);
    }
    trace(TRACE_JOINED);
    return 0;
}

/* Forward: x [M, K] fp32 (x_bf16 = 0) or bf16 (1), y fp32 [M, N], M <= MAX_ROWS. Returns 0, -1 on bad
 * arguments, -2 without memory for the scratch. */
int nf4_gemv(const uint8_t *packed, const float *scales, const float *code16, const void *x, int x_bf16, float *y,
             i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2, const float *code2,
             float offset) {
    plan_t p;
    if (M < 1 || M > MAX_ROWS || make_plan(&p, code16, N, K, bs) || set_scales(&p, scales, q, absmax2, code2, offset))
        return -1;
    p.packed = packed;
    return gemv_call(&p, x, x_bf16, y, M, threads);
}

/* The whole few-rows forward: y = x W^T + scaling (x A^T) B^T (+ bias), x fp32 [M, K], A and B fp32 or both bf16
 * (ab_bf16); writes xa = x A^T [M, rank] (fp32) for the backward. rank 0: no LoRA (a, b, xa unused); bias
 * NULL: none. */
int nf4_lora_gemv(const uint8_t *packed, const float *scales, const float *code16, const float *x, float *y, i64 M,
                  i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2, const float *code2,
                  float offset, i64 rank, const void *a, const void *b, int ab_bf16, const float *bias,
                  float scaling, float *xa) {
    plan_t p;
    if (M < 1 || M > MAX_ROWS || rank < 0 || rank > MAX_RANK || (rank && (!a || !b || !xa)) ||
        make_plan(&p, code16, N, K, bs) || set_scales(&p, scales, q, absmax2, code2, offset))
        return -1;
    const lora_t lo = {.rank = rank, .a = a, .b = b, .ab_bf16 = ab_bf16, .bias = bias, .scaling = scaling, .xa = xa};
    p.packed = packed;
    p.lora = &lo;
    return gemv_call(&p, x, 0, y, M, threads);
}

/* ---- backward (input gradient): dx[m, k] = sum_n g[m, n] W[n, k] ------------------------------------------ */

/* Offset loads in the backward: ~20% faster in the AVX-512 build once loaded once (offset_load); ~7% slower in
 * the AVX2 build (32-byte groups, 3-uop lookups), which shifts (measured, docs/quant_linear.md, "GEMV kernel"). */
#ifndef NF4_BWD_OFFSET_LOADS
#define NF4_BWD_OFFSET_LOADS (L == 16)
#endif
/* rows of W per pass in the one-row backward (AVX-512 build): each dx partial vector is loaded and stored once per
 * pass, so more rows per pass mean fewer of those per byte of W (at 14336 columns the partials, 57 KB, do not fit
 * the 48 KB L1). 8 against 4, interleaved in one process, weights streamed from DRAM (Ice Lake, 2026-12-06): one
 * thread 0.89-0.90x the time at 4096x14336, 0.93-0.95x at 4096x4096; two threads 0.88-0.98x and 0.99-1.03x; the
 * same sums in the same order (rows are added one by one either way), +0.4 s of build. */
#ifndef NF4_BWD_RB1
#define NF4_BWD_RB1 8
#endif
#define BWD_MAX_RB (NF4_BWD_RB1 > 4 ? NF4_BWD_RB1 : 4)

/* bwd_block's loop over groups for rows [n, n + rows) of W (coef: the one-row coefficients, or NULL) */
AI void bwd_groups(const plan_t *p, const uint8_t *packed, const float *g, float *dxs, i64 g0, i64 g1, i64 n,
                   int rows, const float *const *srows, float (*coef)[MAX_ROW_BLOCKS], const int R, const int RB,
                   const int kind, const int offs) {
    const i64 N = p->N, K = p->K;
    for (i64 gi = g0; gi < g1; gi++) {
        vi v[BWD_MAX_RB];
        vf cf[BWD_MAX_RB][MAX_ROWS];
        for (int rb = 0; rb < RB; rb++) {
            const i64 r = rb < rows ? n + rb : n; /* a missing row repeats row n with coefficient 0 */
            prefetch_ahead(packed + r * p->half + gi * GROUP_BYTES, gi, RB * p->half);
            v[rb] = group_load(packed + r * p->half + gi * GROUP_BYTES);
            if (coef) {
                cf[rb][0] = group_scale_k(p, coef[rb], gi, kind);
                continue;
            }
            const vf sc = group_scale_k(p, srows[rb], gi, kind);
            for (int m = 0; m < R; m++) cf[rb][m] = rb < rows ? vmul(vset1(g[m * N + r]), sc) : vzero();
        }
        float *dg = dxs + gi * GROUP_COLS;
        vi cur[BWD_MAX_RB]; /* the offset load of nibbles s and s + 1 (s even) */
#pragma GCC unroll 8
        for (int s = 0; s < 8; s++) {
            vf d[MAX_ROWS];
            for (int m = 0; m < R; m++) d[m] = vload(dg + m * K + s * L);
            for (int rb = 0; rb < RB; rb++) {
                const i64 r = rb < rows ? n + rb : n;
                if (!(s & 1)) cur[rb] = s && offs ? offset_load(packed + r * p->half + gi * GROUP_BYTES + s / 2) : v[rb];
                const vf w = lookup(shift_right(cur[rb], offs ? 4 * (s & 1) : 4 * s), p->lut);
                for (int m = 0; m < R; m++) d[m] = vfma(w, cf[rb][m], d[m]);
            }
            for (int m = 0; m < R; m++) vstore(dg + m * K + s * L, d[m]);
        }
    }
}

/* Groups [g0, g1) of out (group order, M = R rows of K floats) = the sum over rows [n0, n1) of W, RB rows at a
 * time: each out vector is loaded and stored once per RB rows; the coefficient g[m, n] * scale is formed once per
 * row and group, or, with one row of x, once per row and block before the groups (in place of the decoded
 * scales, then read like scales). */
AI void bwd_block(const plan_t *p, const uint8_t *packed, const float *g, float *out, i64 g0, i64 g1, i64 n0, i64 n1,
                  const int R, const int RB, const int kind) {
    const i64 N = p->N, K = p->K;
    for (int m = 0; m < R; m++) memset(out + m * K + g0 * GROUP_COLS, 0, (size_t)((g1 - g0) * GROUP_COLS) * 4);
    const i64 b0 = g0 * GROUP_COLS / p->bs, b1 = (g1 * GROUP_COLS + p->bs - 1) / p->bs; /* the blocks read */
    /* the decoded scales of the pass's rows; in the one-row backward, overwritten in place by the coefficients
     * g[n] * scale (prescale), formed once per block instead of once per group */
    float decoded[BWD_MAX_RB][MAX_ROW_BLOCKS];
    const int prescale = R == 1;
    for (i64 n = n0; n < n1; n += RB) {
        const int rows = n1 - n < RB ? (int)(n1 - n) : RB;
        const float *srows[BWD_MAX_RB];
        prefetch_scales(p, n + RB, RB, b0, b1);
        for (int rb = 0; rb < RB; rb++) {
            srows[rb] = row_scales(p, rb < rows ? n + rb : n, b0, b1, decoded[rb]);
            if (prescale) /* the same products as vmul(vset1(g), sc) in bwd_groups: bit-identical */
                for (i64 b = b0; b < b1; b++) decoded[rb][b] = rb < rows ? g[n + rb] * srows[rb][b] : 0.0f;
        }
        if (NF4_BWD_OFFSET_LOADS && R == 1 && n + RB < N) /* past a group: never on the array's last row */
            bwd_groups(p, packed, g, out, g0, g1, n, rows, srows, prescale ? decoded : NULL, R, RB, kind, 1);
        else
            bwd_groups(p, packed, g, out, g0, g1, n, rows, srows, prescale ? decoded : NULL, R, RB, kind, 0);
    }
}

AI void bwd_block_k(const plan_t *p, const uint8_t *packed, const float *g, float *out, i64 g0, i64 g1, i64 n0,
                    i64 n1, const int R, const int RB) {
    if (scales_kind(p, R) == SCALES_TWO) bwd_block(p, packed, g, out, g0, g1, n0, n1, R, RB, SCALES_TWO);
    else bwd_block(p, packed, g, out, g0, g1, n0, n1, R, RB, SCALES_ANY);
}

/* bwd_block for M rows of g (constant row counts: the accumulators stay in registers). Not inlined: inlined
 * into the OpenMP region it was 4-10% slower (1 thread, AVX-512, 1-2 rows of g, measured). */
static __attribute__((noinline)) void bwd_block_m(const plan_t *p, const float *g, float *out, i64 g0, i64 g1,
                                                  i64 n0, i64 n1, i64 M) {
    switch (M) {
#if L == 16
    case 1: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 1, NF4_BWD_RB1); break;
    case 2: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 2, 4); break;
    case 3: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 3, 2); break;
    default: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 4, 2); break;
#else
    case 1: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 1, 4); break;
    case 2: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 2, 2); break;
    case 3: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 3, 1); break;
    default: bwd_block_k(p, p->packed, g, out, g0, g1, n0, n1, 4, 1); break;
#endif
    }
}

/* The backward's row slabs: at most BWD_SLABS, each a multiple of BWD_SLAB_ROWS rows (whole RB passes), set by N
 * alone, so the partial sums and their reduction are the same at any thread count. */
#ifndef BWD_SLABS
#define BWD_SLABS 8 /* 16: 2-3% slower at 1 thread, 4: 1% faster (AVX-512, 1-4 rows of g, measured) */
#endif
#define BWD_SLAB_ROWS 16
#ifndef BWD_CHUNK_MIN_ROWS
#define BWD_CHUNK_MIN_ROWS 3 /* rows of g from which a slab's columns go in L1-sized chunks (gemv_t_call) */
#endif
#define BWD_L1_FLOATS 8192 /* a partial chunk's floats (32 KB of a 48 KB L1; 24 KB and 16 KB measured no better) */

typedef struct {
    i64 rows, count; /* rows per slab (the last one may be shorter), number of slabs */
} slabs_t;

static slabs_t bwd_slabs(i64 N) {
    i64 rows = (N + BWD_SLABS - 1) / BWD_SLABS;
    rows = (rows + BWD_SLAB_ROWS - 1) / BWD_SLAB_ROWS * BWD_SLAB_ROWS;
    return (slabs_t){rows, (N + rows - 1) / rows};
}

/* dx's groups [g0, g1) in natural order: the sum of the slabs' partials (group order, M K floats each), added in
 * a fixed tree order (pairs, then pairs of pairs: set by the slab count alone) */
static void bwd_reduce(const plan_t *p, const float *parts, i64 slabs, float *dx, i64 M, i64 g0, i64 g1) {
    const i64 K = p->K, stride = M * K;
    float sum[GROUP_COLS] __attribute__((aligned(64)));
    for (i64 m = 0; m < M; m++)
        for (i64 gi = g0; gi < g1; gi++) {
            const float *src = parts + m * K + gi * GROUP_COLS;
            for (i64 j = 0; j < GROUP_COLS; j += L) {
                vf v[BWD_SLABS];
                for (i64 s = 0; s < slabs; s++) v[s] = vload(src + s * stride + j);
                for (i64 w = 1; w < slabs; w *= 2)
                    for (i64 s = 0; s + w < slabs; s += 2 * w) v[s] = vadd(v[s], v[s + w]);
                vstore(sum + j, v[0]);
            }
            for (i64 j = 0; j < GROUP_COLS; j++) dx[m * K + gi * GROUP_COLS + natural_col(j)] = sum[j];
        }
}

/* LoRA's share of the backward for natural columns [k0, k1), all rows m (gb = g B [M, rank], complete):
 * dx[m, k] += scaling (gb[m] . A[:, k]) (torch's dx.addmm_(gb, A, alpha=scaling): the product, scaled, then
 * added) when dx is wanted, and dA[j, k] = sum_m (gb[m, j] scaling) x[m, k] (torch's (gb * scaling)^T x). A
 * vector of L columns at a time, a scalar tail; which columns take which is fixed by k0 and k1 (group bounds
 * or the tail), so the result does not depend on the thread count. */
static void lora_bwd_cols(const plan_t *p, const lora_t *lo, const float *gb, float *dx, i64 M, i64 k0, i64 k1) {
    const i64 K = p->K, r = lo->rank;
    const int bf = lo->ab_bf16;
    i64 k = k0;
    for (; k + L <= k1; k += L) {
        for (i64 m = 0; m < M && dx; m++) {
            vf l = vmul(vset1(gb[m * r]), load_any(lo->a, bf, k));
            for (i64 j = 1; j < r; j++) l = vfma(vset1(gb[m * r + j]), load_any(lo->a, bf, j * K + k), l);
            vstore(dx + m * K + k, vadd(vload(dx + m * K + k), vmul(vset1(lo->scaling), l)));
        }
        for (i64 j = 0; j < r && lo->da; j++) {
            vf d = vmul(vset1(gb[j] * lo->scaling), vload(lo->x + k));
            for (i64 m = 1; m < M; m++) d = vfma(vset1(gb[m * r + j] * lo->scaling), vload(lo->x + m * K + k), d);
            store_any(lo->da, bf, j * K + k, d);
        }
    }
    for (; k < k1; k++) {
        for (i64 m = 0; m < M && dx; m++) {
            float l = gb[m * r] * at_any(lo->a, bf, k);
            for (i64 j = 1; j < r; j++) l = __builtin_fmaf(gb[m * r + j], at_any(lo->a, bf, j * K + k), l);
            dx[m * K + k] = dx[m * K + k] + lo->scaling * l;
        }
        for (i64 j = 0; j < r && lo->da; j++) {
            float d = (gb[j] * lo->scaling) * lo->x[k];
            for (i64 m = 1; m < M; m++) d = __builtin_fmaf(gb[m * r + j] * lo->scaling, lo->x[m * K + k], d);
            put_any(lo->da, bf, j * K + k, d);
        }
    }
}

/* gb[m, j] = sum_n g[m, n] B[n, j] for j in [j0, j1): four partial sums over n mod 4, added in a fixed order */
static void lora_gb(const lora_t *lo, const float *g, i64 M, i64 N, i64 j0, i64 j1, float *gb) {
    const i64 r = lo->rank;
    for (i64 m = 0; m < M; m++) {
        float acc[4][MAX_RANK];
        for (int u = 0; u < 4; u++)
            for (i64 j = j0; j < j1; j++) acc[u][j] = 0.0f;
        i64 n = 0;
        for (; n + 4 <= N; n += 4)
            for (int u = 0; u < 4; u++) {
                const float gn = g[m * N + n + u];
                if (lo->ab_bf16) {
                    const uint16_t *brow = (const uint16_t *)lo->b + (n + u) * r;
                    for (i64 j = j0; j < j1; j++) acc[u][j] += gn * bf16_f32(brow[j]);
                } else {
                    const float *brow = (const float *)lo->b + (n + u) * r;
                    for (i64 j = j0; j < j1; j++) acc[u][j] += gn * brow[j];
                }
            }
        for (; n < N; n++)
            for (i64 j = j0; j < j1; j++) acc[0][j] += g[m * N + n] * at_any(lo->b, lo->ab_bf16, n * r + j);
        for (i64 j = j0; j < j1; j++) gb[m * r + j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    }
}

/* The backward's one OpenMP region. dx = g W is summed by row slabs of W (bwd_slabs: a number set by N, not by
 * the thread count), each into its own partial (all of K, group order); each thread takes a contiguous range of
 * slabs (2 threads: 4 slabs each), so it reads whole rows of W, one stream (the column split before gave each
 * thread half-row segments: docs/quant_linear.md, "GEMV kernel", threads). After the barrier the partials are
 * added in a fixed order and put back in natural order, columns (whole groups) split over the threads. Every
 * element is summed in the same order at any thread count. With LoRA, also before the barrier: dB for the
 * thread's rows (16 at a time), gb = g B for its share of B's columns; after it, with its dx columns: their
 * LoRA terms and dA's same columns. dx NULL: only the LoRA gradients (the weight is not read). */
static int gemv_t_call(const plan_t *p, const float *g, float *dx, i64 M, int threads) {
    const i64 N = p->N, K = p->K;
    const lora_t *lo = p->lora;
    const slabs_t slabs = bwd_slabs(N);
    /* With 3-4 rows of g, a slab's columns go in chunks whose partial (M rows) fits in L1: every dx vector is
     * loaded and stored once per RB = 2 rows of W, and from L2 that was the bottleneck (1 thread, AVX-512,
     * 4 rows: 1.55-1.75x the time at 4096 and 14336 columns). With 1-2 rows whole rows of W, one stream (chunked:
     * 3% slower at 14336 columns). The sums are the same for any chunking. (docs/quant_linear.md, "GEMV kernel") */
    i64 chunk = M >= BWD_CHUNK_MIN_ROWS ? BWD_L1_FLOATS / (M * GROUP_COLS) : p->groups;
    if (chunk < 1) chunk = 1;
    float *parts = dx ? scratch(slabs.count * M * K) : NULL;
    if (dx && !parts) return -2;
    float gb[MAX_ROWS * MAX_RANK]; /* shared by the team */
    if (threads > MAX_TEAM) threads = MAX_TEAM;
    if (threads < 1) threads = 1;
    /* the work: units of (slab, columns), each slab's columns in `cuts` ranges of whole groups so that the team
     * divides the units evenly (cuts = 1, whole rows, when it divides the slabs). Each thread starts on a
     * contiguous share of the units and takes them from its front; one that runs out takes units from the back
     * of the others' shares, as the forward steals row chunks: a thread slowed by its neighbour or the host
     * holds up the call by at most one unit (benchmarks/nf4_decode.py --threads 2, 4096x14336 streamed, 11
     * rounds: 0.84x and 0.92x the time of the static split in two runs where one thread ran slower, 1.01x in one
     * where neither did; column cuts to steal finer, 2 or 4 a slab, were slower than whole rows: 0.98-1.35x).
     * Which thread sums a unit changes nothing. */
    i64 common = slabs.count, rest = threads;
    while (rest) { /* gcd(slabs, threads) */
        const i64 r = common % rest;
        common = rest, rest = r;
    }
    const i64 cuts = threads / common, units = slabs.count * cuts;
    share_t shares[MAX_TEAM] __attribute__((aligned(64)));
    for (int t = 0; t < threads; t++) /* set before the fork: a thief may look at any share at once */
        shares[t].span = ((uint64_t)(units * (t + 1) / threads) << 32) | (uint64_t)(units * t / threads);
    trace(TRACE_ENTRY);
#pragma omp parallel num_threads(threads)
    {
        trace(TRACE_FORKED);
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        i64 u, g0, g1;
        for (int v = 0; v < threads && dx; v++) {
            if (v && !NF4_STEAL && (me + v) % threads < team) continue; /* static split: unowned shares only */
            share_t *share = &shares[(me + v) % threads];
            while (v ? take_back(share, &u) : take_front(share, &u)) {
                const i64 s = u / cuts, n0 = s * slabs.rows, n1 = n0 + slabs.rows < N ? n0 + slabs.rows : N;
                const i64 c0 = p->groups * (u % cuts) / cuts, c1 = p->groups * (u % cuts + 1) / cuts;
                for (i64 c = c0; c < c1; c += chunk)
                    bwd_block_m(p, g, parts + s * M * K, c, c + chunk < c1 ? c + chunk : c1, n0, n1, M);
            }
        }
        if (dx && omp_get_thread_num() == 0) /* tail blocks (bs < 8L only), scalar, one thread */
            for (i64 m = 0; m < M; m++)
                for (i64 k = p->groups * GROUP_COLS; k < K; k++) {
                    float acc = 0.0f;
                    for (i64 n = 0; n < N; n++)
                        acc += g[m * N + n] * block_scale(p, n * p->nb + k / p->bs) *
                               code_of(p, p->packed + n * p->half, k);
                    dx[m * K + k] = acc;
                }
        if (lo && lo->rank) {
            const i64 r = lo->rank;
            i64 n0, n1, j0, j1;
            if (lo->db) { /* dB[n, j] = sum_m g[m, n] (xa[m, j] scaling): L values of j at a time, a scalar tail */
                float xas[MAX_ROWS * MAX_RANK];
                for (i64 i = 0; i < M * r; i++) xas[i] = lo->xa[i] * lo->scaling;
                thread_range(N, 16, &n0, &n1);
                for (i64 n = n0; n < n1; n++) {
                    i64 j = 0;
                    for (; j + L <= r; j += L) {
                        vf d = vmul(vset1(g[n]), vload(xas + j));
                        for (i64 m = 1; m < M; m++) d = vfma(vset1(g[m * N + n]), vload(xas + m * r + j), d);
                        store_any(lo->db, lo->ab_bf16, n * r + j, d);
                    }
                    for (; j < r; j++) {
                        float d = g[n] * xas[j];
                        for (i64 m = 1; m < M; m++) d = __builtin_fmaf(g[m * N + n], xas[m * r + j], d);
                        put_any(lo->db, lo->ab_bf16, n * r + j, d);
                    }
                }
            }
            thread_range(r, 1, &j0, &j1);
            lora_gb(lo, g, M, N, j0, j1, gb);
        }
        trace(TRACE_PHASE1);
#pragma omp barrier
        trace(TRACE_BARRIER);
        thread_range(p->groups, 1, &g0, &g1);
        if (dx) bwd_reduce(p, parts, slabs.count, dx, M, g0, g1);
        if (lo && lo->rank) {
            lora_bwd_cols(p, lo, gb, dx, M, g0 * GROUP_COLS, g1 * GROUP_COLS);
            if (omp_get_thread_num() == 0) lora_bwd_cols(p, lo, gb, dx, M, p->groups * GROUP_COLS, K);
        }
        trace(TRACE_DONE);
    }
    trace(TRACE_JOINED);
    return 0;
}

/* Backward: g fp32 [M, N] -> dx fp32 [M, K] in natural order, M <= MAX_ROWS. */
int nf4_gemv_t(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx, i64 M,
               i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2, const float *code2,
               float offset) {
    plan_t p;
    if (M < 1 || M > MAX_ROWS || !dx || make_plan(&p, code16, N, K, bs) ||
        set_scales(&p, scales, q, absmax2, code2, offset))
        return -1;
    p.packed = packed;
    return gemv_t_call(&p, g, dx, M, threads);
}

/* The whole few-rows backward of nf4_lora_gemv: dx = g W + scaling (g B) A (NULL: not wanted, W not read),
 * dA = scaling (g B)^T x and dB = g^T (scaling xa) (each NULL: not wanted; written in A's and B's dtype);
 * x fp32 [M, K], xa [M, rank] from the forward. */
int nf4_lora_gemv_t(const uint8_t *packed, const float *scales, const float *code16, const float *g, float *dx,
                    i64 M, i64 N, i64 K, i64 bs, int threads, const uint8_t *q, const float *absmax2,
                    const float *code2, float offset, i64 rank, const void *a, const void *b, int ab_bf16,
                    const float *xa, float scaling, const float *x, void *da, void *db) {
    plan_t p;
    if (M < 1 || M > MAX_ROWS || rank < 1 || rank > MAX_RANK || !a || !b || !xa || (da && !x) ||
        make_plan(&p, code16, N, K, bs) || set_scales(&p, scales, q, absmax2, code2, offset))
        return -1;
    const lora_t lo = {.rank = rank, .a = a, .b = b, .ab_bf16 = ab_bf16, .scaling = scaling, .xa = (float *)xa, .x = x,
                       .da = da, .db = db};
    p.packed = packed;
    p.lora = &lo;
    return gemv_t_call(&p, g, dx, M, threads);
}

/* ---- dequantise (natural order, for the GEMM path) ------------------------------------------------------- */

/* fp32 -> bf16, round to nearest even (what torch's .to(torch.bfloat16) does) */
#if L == 16
AI __m256i to_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

/* stream: non-temporal stores (out + at 64-byte aligned; the caller checks) */
AI void store_natural(void *out, i64 at, int kind, vf lo, vf hi, const int stream) {
    if (kind == 0) {
        float *o = (float *)out + at;
        if (stream) _mm512_stream_ps(o, lo), _mm512_stream_ps(o + 16, hi);
        else _mm512_storeu_ps(o, lo), _mm512_storeu_ps(o + 16, hi);
    } else {
        uint16_t *o = (uint16_t *)out + at;
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m256i a = kind == 1 ? to_bf16(lo) : _mm512_cvtps_ph(lo, r);
        const __m256i b = kind == 1 ? to_bf16(hi) : _mm512_cvtps_ph(hi, r);
        if (stream) _mm256_stream_si256((__m256i *)o, a), _mm256_stream_si256((__m256i *)(o + 16), b);
        else _mm256_storeu_si256((__m256i *)o, a), _mm256_storeu_si256((__m256i *)(o + 16), b);
    }
}

/* 32 weights (16 bytes) -> natural order, times the block scale */
AI void dequant_chunk(const uint8_t *p, vf s, lut_t lut, void *out, i64 at, int kind, const int stream) {
    /* natural column 2j is even[j], 2j+1 is odd[j]: interleave the two halves */
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const vf we = vmul(lookup(_mm512_srli_epi32(v, 4), lut), s), wo = vmul(lookup(v, lut), s);
    store_natural(out, at, kind, _mm512_permutex2var_ps(we, lo_idx, wo), _mm512_permutex2var_ps(we, hi_idx, wo),
                  stream);
}
#elif L == 8
AI __m128i to_bf16(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)); /* values <= 0xffff */
}

AI void store_natural8x2(void *out, i64 at, int kind, vf lo, vf hi, const int stream) {
    if (kind == 0) {
        float *o = (float *)out + at;
        if (stream) _mm256_stream_ps(o, lo), _mm256_stream_ps(o + 8, hi);
        else _mm256_storeu_ps(o, lo), _mm256_storeu_ps(o + 8, hi);
    } else {
        uint16_t *o = (uint16_t *)out + at;
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m128i a = kind == 1 ? to_bf16(lo) : _mm256_cvtps_ph(lo, r);
        const __m128i b = kind == 1 ? to_bf16(hi) : _mm256_cvtps_ph(hi, r);
        if (stream) _mm_stream_si128((__m128i *)o, a), _mm_stream_si128((__m128i *)(o + 8), b);
        else _mm_storeu_si128((__m128i *)o, a), _mm_storeu_si128((__m128i *)(o + 8), b);
    }
}

/* 32 weights (16 bytes) -> natural order, times the block scale; 8 bytes (16 weights) at a time */
AI void dequant_chunk(const uint8_t *p, vf s, lut_t lut, void *out, i64 at, int kind, const int stream) {
    for (int h = 0; h < 2; h++) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)));
        const vf we = vmul(lookup(_mm256_srli_epi32(v, 4), lut), s), wo = vmul(lookup(v, lut), s);
        const vf a = _mm256_unpacklo_ps(we, wo), b = _mm256_unpackhi_ps(we, wo); /* e0 o0 e1 o1 | e4 o4 e5 o5 */
        store_natural8x2(out, at + 16 * h, kind, _mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31),
                         stream);
    }
}
#else /* NEON */
/* the x86 layers' to_bf16: round to nearest even, no NaN case (the same bits as they give, NaN included) */
AI uint16x4_t to_bf16(vf v) {
    const uint32x4_t b = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(1));
    return vmovn_u32(vshrq_n_u32(vaddq_u32(b, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16));
}

AI void store_natural4(void *out, i64 at, int kind, vf v) {
    if (kind == 0) vst1q_f32((float *)out + at, v);
    else if (kind == 1) vst1_u16((uint16_t *)out + at, to_bf16(v));
    else vst1_u16((uint16_t *)out + at, vreinterpret_u16_f16(vcvt_f16_f32(v))); /* FPCR: nearest even */
}

/* 32 weights (16 bytes) -> natural order, times the block scale: the high nibbles (even columns) and the low
 * ones (odd) interleaved as bytes, widened to dwords 4 at a time and looked up (stream: ignored, plain stores) */
AI void dequant_chunk(const uint8_t *p, vf s, lut_t lut, void *out, i64 at, int kind, const int stream) {
    (void)stream;
    const uint8x16_t b = vld1q_u8(p), even = vshrq_n_u8(b, 4), odd = vandq_u8(b, vdupq_n_u8(15));
    const uint8x16_t nat[2] = {vzip1q_u8(even, odd), vzip2q_u8(even, odd)}; /* columns 0..15, 16..31 */
    for (int h = 0; h < 2; h++) {
        const uint16x8_t half[2] = {vmovl_u8(vget_low_u8(nat[h])), vmovl_high_u8(nat[h])};
        for (int q = 0; q < 2; q++) {
            store_natural4(out, at + 16 * h + 8 * q, kind, vmul(lookup(vmovl_u16(vget_low_u16(half[q])), lut), s));
            store_natural4(out, at + 16 * h + 8 * q + 4, kind, vmul(lookup(vmovl_high_u16(half[q]), lut), s));
        }
    }
}
#endif

/* W in natural order, out [numel] as fp32 (kind 0), bf16 (1) or fp16 (2): code * absmax in fp32, then
 * rounded to nearest even, bit-identical to bnb's dequantize_4bit and to the reference. numel % 32 == 0.
 * stream: write with non-temporal stores (x86; ignored unless out is 64-byte aligned, and on NEON). For a W larger
 * than the caches that the GEMM then reads once, plain stores first read every line of out (read for ownership)
 * and then write it back: streaming halves the traffic, and the dequantisation's time with it (docs/quant_linear.md,
 * "Batch 512": 7.6 -> 4.0 ms for 4096x4096 fp32 at one thread). */
int nf4_dequantize(const uint8_t *packed, const float *scales, const float *code16, void *out, i64 numel, i64 bs,
                   int kind, int threads, int stream) {
    if (numel % 32 || bs < 32 || bs % 32 || kind < 0 || kind > 2) return -1;
    const lut_t lut = lut_load(code16);
    const i64 chunks = numel / 32;
    if (L == 4 || ((uintptr_t)out & 63)) stream = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 c = 0; c < chunks; c++)
            dequant_chunk(packed + c * 16, vset1(scales[c * 32 / bs]), lut, out, c * 32, kind, stream);
        if (stream) store_fence(); /* this thread's streamed lines reach memory before the region's closing barrier */
    }
    return 0;
}

/* Double-quantised absmax: scale[i] = code2[q[i]] * absmax2[i / 256] + offset, rounded as bnb does (two
 * fp32 roundings, no FMA). */
void nf4_decode_absmax(const uint8_t *q, const float *absmax2, const float *code2, float offset, float *out,
                       i64 nblocks) {
    for (i64 i = 0; i < nblocks; i++) out[i] = code2[q[i]] * absmax2[i / 256] + offset;
}

/* dst = src ([rows, row_bytes]), each row written by the thread whose forward GEMV reads it when no thread
 * steals (its initial share of chunks, gemv_call): on a multi-socket machine the pages then sit on that
 * thread's node (first touch). */
int nf4_first_touch_copy(const uint8_t *src, uint8_t *dst, i64 rows, i64 row_bytes, int threads) {
    if (rows < 0 || row_bytes < 0) return -1;
    if (threads > MAX_TEAM) threads = MAX_TEAM;
    if (threads < 1) threads = 1;
    const i64 chunks = (rows + STEAL_ROWS - 1) / STEAL_ROWS;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads(); /* the team it got: every row copied */
        const i64 n0 = chunks * t / nt * STEAL_ROWS, end = chunks * (t + 1) / nt * STEAL_ROWS;
        const i64 n1 = end < rows ? end : rows;
        if (n1 > n0) memcpy(dst + n0 * row_bytes, src + n0 * row_bytes, (size_t)((n1 - n0) * row_bytes));
    }
    return 0;
}

/* The NF4_TRACE build's timestamps of the last whole-call kernel into out [TRACE_THREADS][TRACE_POINTS][2] (clock,
 * thread CPU time; 0: not reached); returns TRACE_POINTS, or 0 in a build without tracing. */
int nf4_trace(i64 *out) {
#if NF4_TRACE
    memcpy(out, trace_ns, sizeof trace_ns);
    memset(trace_ns, 0, sizeof trace_ns);
    return TRACE_POINTS;
#else
    (void)out;
    return 0;
#endif
}

/* Which vector layer this build has (512: AVX-512, 2: AVX2, 128: NEON). */
int nf4_native_isa(void) { return NF4_ISA; }

/* Lets Python confirm it loaded this source's build. */
int nf4_native_abi(void) { return 4; }

/* ---- dequantise a panel (for the GEMM path's panel tiling: docs/quant_linear.md, "Batch 512") -------------- */

/* compilers with AVX512-BF16 intrinsics and __builtin_cpu_supports("avx512bf16"); older ones build without it */
#if L == 16 && ((defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 11))
#define NF4_PANEL_BF16 1
/* bf16 panels with AVX512-BF16 (built for that target, called only where the CPU has it): vcvtne2ps2bf16
 * narrows 32 floats in one instruction and a word permute interleaves even/odd columns, ~9 vector uops per
 * 32 weights instead of ~22 (the manual rounding + dword narrowing of to_bf16). It rounds to nearest even
 * like to_bf16 but treats denormal inputs as zero, so a chunk takes it only when its scale makes every
 * product zero or normal (|s| >= s_min, finite); other chunks take dequant_chunk: bit-identical either way. */
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,fma")))
static void panel_bf16(const uint8_t *packed, const float *scales, const float *code16, uint16_t *out, i64 K,
                       i64 bs, i64 r0, i64 r1, i64 c0, i64 c1, i64 ld, float s_min, int threads) {
    const lut_t lut = lut_load(code16);
    const i64 half = K / 2, nb = K / bs, cols = c1 - c0;
    const int bs_log2 = __builtin_ctzll((unsigned long long)bs); /* a shift, not a division per chunk */
    int16_t order[32]; /* natural column p <- even[p / 2] (low half) or odd[p / 2] (high half) */
    for (int q = 0; q < 32; q++) order[q] = (int16_t)((q & 1) * 16 + q / 2);
    const __m512i idx = _mm512_loadu_si512((const void *)order);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 r = r0; r < r1; r++) {
        const uint8_t *row = packed + r * half;
        const float *srow = scales + r * nb;
        const i64 at = (r - r0) * ld;
        for (i64 c = 0; c < cols; c += 32) {
            const float sf = srow[(c0 + c) >> bs_log2], mag = sf < 0 ? -sf : sf;
            if (!(mag >= s_min && mag <= 3.4028234663852886e38f)) { /* denormal products possible, or inf/NaN */
                dequant_chunk(row + (c0 + c) / 2, vset1(sf), lut, out, at + c, 1, 0);
                continue;
            }
            const vf s = vset1(sf);
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (c0 + c) / 2)));
            const vf we = vmul(lookup(_mm512_srli_epi32(v, 4), lut), s), wo = vmul(lookup(v, lut), s);
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(wo, we); /* low 16 words: even, high: odd */
            _mm512_storeu_si512((void *)(out + at + c), _mm512_permutexvar_epi16(idx, both));
        }
    }
}
#endif

/* Rows [r0, r1) and columns [c0, c1) of W (c0, c1 multiples of 32) in natural order into out, row r - r0 at
 * out + (r - r0) * ld elements: the same chunks and arithmetic as nf4_dequantize, so the panel is bit-identical
 * to that slice of the whole dequantisation. A 32-column chunk never straddles a block (bs is a power of two
 * >= 32), so its scale is the one of the chunk's first element. Threads split the rows. fast_bf16: allow the
 * AVX512-BF16 narrowing where the CPU has it (0 forces the portable one; the tests compare both). */
int nf4_dequantize_panel(const uint8_t *packed, const float *scales, const float *code16, void *out, i64 N, i64 K,
                         i64 bs, i64 r0, i64 r1, i64 c0, i64 c1, i64 ld, int kind, int threads, int fast_bf16) {
    if (K % 32 || bs < 32 || (bs & (bs - 1)) || K % bs || kind < 0 || kind > 2 || r0 < 0 || r1 > N || r0 > r1 || c0 < 0 ||
        c1 > K || c0 > c1 || c0 % 32 || c1 % 32 || ld < c1 - c0)
        return -1;
#ifdef NF4_PANEL_BF16
    if (kind == 1 && fast_bf16 && __builtin_cpu_supports("avx512bf16")) {
        float cmin = 0.0f; /* smallest nonzero |code|: |s| * cmin >= 2 * FLT_MIN keeps every product normal */
        for (int i = 0; i < 16; i++) {
            const float a = code16[i] < 0 ? -code16[i] : code16[i];
            if (a > 0 && (cmin == 0.0f || a < cmin)) cmin = a;
        }
        const float s_min = cmin > 0 ? 2.3509887016445750e-38f / cmin : 0.0f;
        panel_bf16(packed, scales, code16, (uint16_t *)out, K, bs, r0, r1, c0, c1, ld, s_min, threads);
        return 0;
    }
#else
    (void)fast_bf16;
#endif
    const lut_t lut = lut_load(code16);
    const i64 half = K / 2, nb = K / bs, cols = c1 - c0;
    const int bs_log2 = __builtin_ctzll((unsigned long long)bs); /* bs is a power of two (Python checks) */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 r = r0; r < r1; r++) {
        const uint8_t *row = packed + r * half;
        const float *srow = scales + r * nb;
        const i64 at = (r - r0) * ld;
        for (i64 c = 0; c < cols; c += 32)
            dequant_chunk(row + (c0 + c) / 2, vset1(srow[(c0 + c) >> bs_log2]), lut, out, at + c, kind, 0);
    }
    return 0;
}

/* 1 when nf4_dequantize_panel's AVX512-BF16 path can run here. */
int nf4_panel_fast_bf16(void) {
#ifdef NF4_PANEL_BF16
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}
