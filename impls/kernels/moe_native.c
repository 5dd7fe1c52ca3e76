/* bf16 elementwise kernels of the SparseMoE FFN (impls/moe_ffn/sorted_experts.py): each one pass over its rows, the
 * math in fp32 registers, one rounding to bf16 per output (torch's bf16 ops round after every op and convert on
 * every op: docs/moe.md, "bf16: the work around the GEMMs").
 *
 * Plain C written for the compiler's auto-vectoriser (no intrinsics, no torch headers, no OpenMP: the caller
 * splits rows over its own worker threads; ctypes releases the GIL). Built at first use by
 * impls/kernels/moe_native.py (cached by source hash and flags) and called on tensors' data pointers; Python
 * checks dtypes, shapes and strides.
 *
 * bf16 <-> fp32 as torch does it: widening is a shift; narrowing rounds to nearest even and maps NaN to 0x7FC0.
 * exp is a Cephes-style polynomial (max relative error ~2 ulp of fp32, far below bf16's 2^-8), branch-free so
 * it vectorises; past [-87.3, 88.3] it returns 0 and inf, so sigmoid is exactly 1 and 0 there and silu(+-inf) is
 * +inf and NaN as in torch; a NaN passes through.
 */
#include <stdint.h>

typedef int64_t i64;
typedef uint16_t bf16;

#define AI static inline __attribute__((always_inline))
#define LANES 16 /* accumulator lanes of the dot products: one AVX-512 vector, two AVX2 ones */

AI float from_bf16(bf16 b) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)b << 16;
    return v.f;
}

AI bf16 to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    uint32_t rounded = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16;
    return (bf16)(f != f ? 0x7FC0u : rounded);
}

AI float exp_approx(float x0) {
    float x = x0 > 88.3f ? 88.3f : x0;   /* 2^n stays a normal float: n in [-126, 127] */
    x = x < -87.3f ? -87.3f : x;
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;          /* ln 2 in two parts (Cody-Waite) */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } s;
    s.u = (uint32_t)((int32_t)n + 127) << 23;
    y = y * s.f;
    y = x0 > 88.3f ? __builtin_inff() : y;   /* past the ends: inf and 0, so sigmoid is exactly 0 and 1 there */
    return x0 < -87.3f ? 0.0f : y;
}

AI float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }

int moe_native_abi(void) { return 1; }

/* a[r, i] = silu(h[r, i]) * h[r, inter + i] for r < rows, i < inter (h: [rows, 2 inter], gate then up). */
void moe_swiglu_forward(const bf16 *h, i64 ldh, bf16 *a, i64 lda, i64 rows, i64 inter) {
    for (i64 r = 0; r < rows; r++) {
        const bf16 *gate = h + r * ldh, *up = gate + inter;
        bf16 *out = a + r * lda;
        for (i64 i = 0; i < inter; i++) {
            float g = from_bf16(gate[i]);
            out[i] = to_bf16(g * sigmoid(g) * from_bf16(up[i]));
        }
    }
}

/* The SwiGLU backward from d(a) = ga [rows, inter]: d(gate) = ga * up * s * (1 + g (1 - s)) and d(up) = ga * g s
 * (s = sigmoid(gate)), written to gh [rows, 2 inter] (gate half, then up half). */
void moe_swiglu_backward(const bf16 *h, i64 ldh, const bf16 *ga, i64 ldga, bf16 *gh, i64 ldgh, i64 rows,
                         i64 inter) {
    for (i64 r = 0; r < rows; r++) {
        const bf16 *gate = h + r * ldh, *up = gate + inter, *d = ga + r * ldga;
        bf16 *dgate = gh + r * ldgh, *dup = dgate + inter;
        for (i64 i = 0; i < inter; i++) {
            float g = from_bf16(gate[i]), u = from_bf16(up[i]), da = from_bf16(d[i]);
            float s = sigmoid(g);
            dgate[i] = to_bf16(da * u * (s * (1.0f + g * (1.0f - s))));
            dup[i] = to_bf16(da * (g * s));
        }
    }
}

/* out[t] = sum over slots j < k of w[row] * y[row], row = slot_row[t k + j], for tokens t0 <= t < t1, summed in fp32
 * in slot order and rounded once (w NULL: weight 1). y [S, cols] bf16 (row stride ldy), out [T, cols] bf16. acc is
 * the caller's fp32 scratch of cols floats. */
void moe_combine(const bf16 *y, i64 ldy, const float *w, const i64 *slot_row, i64 k, bf16 *out, i64 ldo, i64 t0,
                 i64 t1, i64 cols, float *acc) {
    for (i64 t = t0; t < t1; t++) {
        for (i64 c = 0; c < cols; c++) acc[c] = 0.0f;
        for (i64 j = 0; j < k; j++) {
            i64 row = slot_row[t * k + j];
            const bf16 *src = y + row * ldy;
            float wj = w ? w[row] : 1.0f;
            for (i64 c = 0; c < cols; c++) acc[c] += wj * from_bf16(src[c]);
        }
        bf16 *dst = out + t * ldo;
        for (i64 c = 0; c < cols; c++) dst[c] = to_bf16(acc[c]);
    }
}

/* For sorted rows r0 <= r < r1 with token t = token[r]: gy[r] = g[t] * w[r] (the output gradient routed to the
 * row, weighted) and gw[order[r]] = sum_c g[t, c] y[r, c] in fp32 (the router weight's gradient, put back in
 * (token, slot) order). g [T, cols], y and gy [S, cols] bf16. */
void moe_route_gradient(const bf16 *g, i64 ldg, const i64 *token, const i64 *order, const float *w, const bf16 *y,
                        i64 ldy, bf16 *gy, i64 ldgy, float *gw, i64 r0, i64 r1, i64 cols) {
    for (i64 r = r0; r < r1; r++) {
        const bf16 *src = g + token[r] * ldg, *yr = y + r * ldy;
        bf16 *dst = gy + r * ldgy;
        float wr = w[r];
        float lanes[LANES] = {0};
        i64 c = 0;
        for (; c + LANES <= cols; c += LANES) {
            for (int l = 0; l < LANES; l++) {
                float gv = from_bf16(src[c + l]);
                lanes[l] += gv * from_bf16(yr[c + l]);
                dst[c + l] = to_bf16(gv * wr);
            }
        }
        for (; c < cols; c++) {
            float gv = from_bf16(src[c]);
            lanes[0] += gv * from_bf16(yr[c]);
            dst[c] = to_bf16(gv * wr);
        }
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += lanes[l];
        gw[order[r]] = sum;
    }
}
