/* Elementwise loops the client needs and torch does not fuse (see __init__.py):
 *
 * - per-row int8 quantization and scaled dequantization around torch._int_mm
 *   (client/kernels/int8_matmul.py); their arithmetic is exactly that of its torch fallback, in
 *   the same order, so both give the same bits;
 * - the three passes of a frozen int8 gated MLP (client/kernels/int8_mlp.py);
 * - an RMS norm of an fp32 residual stream for bf16 compute, forward and input gradient
 *   (client/kernels/rms_norm.py).
 *
 * The loops are written so that the compiler vectorizes them (bf16 <-> fp32 as bit shifts, row
 * maxima and sums as OpenMP SIMD reductions, rintf without errno) and run rows in parallel on
 * the OpenMP runtime torch itself loaded.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, as torch's float -> bfloat16 conversion; NaN stays NaN */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define TINY 1.17549435e-38f /* FLT_MIN: an all-zero row keeps a finite scale */

/* codes[r, c] = rint(x[r, c] * col_scale[c] * (127 / amax_r)), row_scale[r] = amax_r / 127,
 * amax_r = max_c |x[r, c] * col_scale[c]|; col_scale may be NULL (all ones). */
void offsite_quantize_rows_bf16(const uint16_t *x, int64_t rows, int64_t cols,
                                const float *col_scale, int8_t *codes, float *row_scale,
                                int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * cols;
        int8_t *cr = codes + r * cols;
        float amax = 0.0f;
        if (col_scale) {
#pragma omp simd reduction(max : amax)
            for (int64_t c = 0; c < cols; c++) {
                float v = fabsf(bf16_to_float(xr[c]) * col_scale[c]);
                amax = v > amax ? v : amax;
            }
        } else {
#pragma omp simd reduction(max : amax)
            for (int64_t c = 0; c < cols; c++) {
                float v = fabsf(bf16_to_float(xr[c]));
                amax = v > amax ? v : amax;
            }
        }
        amax = amax > TINY ? amax : TINY;
        float inv = 127.0f / amax;
        row_scale[r] = amax / 127.0f;
        if (col_scale) {
            for (int64_t c = 0; c < cols; c++)
                cr[c] = (int8_t)(int32_t)rintf((bf16_to_float(xr[c]) * col_scale[c]) * inv);
        } else {
            for (int64_t c = 0; c < cols; c++)
                cr[c] = (int8_t)(int32_t)rintf(bf16_to_float(xr[c]) * inv);
        }
    }
}

/* out[r, c] = bf16((float(sums[r, c]) * row_scale[r]) * col_scale[c]); col_scale may be NULL */
void offsite_dequantize_rows_bf16(const int32_t *sums, int64_t rows, int64_t cols,
                                  const float *row_scale, const float *col_scale, uint16_t *out,
                                  int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *sr = sums + r * cols;
        uint16_t *orow = out + r * cols;
        float rs = row_scale[r];
        if (col_scale) {
            for (int64_t c = 0; c < cols; c++)
                orow[c] = float_to_bf16(((float)sr[c] * rs) * col_scale[c]);
        } else {
            for (int64_t c = 0; c < cols; c++) orow[c] = float_to_bf16((float)sr[c] * rs);
        }
    }
}

/* ---- a frozen int8 gated MLP, down(silu(gate(x)) * up(x)), between its integer matmuls ----
 * The three passes below replace, per MLP, two dequantizations, the activation, the product
 * and a quantization going forward, and a dequantization, the product's backward, two
 * quantizations, two dequantizations and a sum coming back (client/kernels/int8_mlp.py).
 * Intermediate values stay in fp32 between the int32 sums and the int8 codes; only what
 * backward keeps (gate and up) is rounded to bf16. */

/* exp(x) for x in [-87, 88] (clamped outside), Cephes' expf: range reduction by ln 2 and a
 * degree-6 polynomial in fused multiply-adds (explicit fmaf: the file is built without
 * contraction, which the quantizing loops need to match torch's bits), ~1 ulp; written so the
 * loops around it vectorize. */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x));
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* codes[c] = rint(v[c] · 127 / amax), returns amax / 127 (the row's scale) */
static inline float quantize_row(const float *v, int64_t cols, float amax, int8_t *codes) {
    amax = amax > TINY ? amax : TINY;
    float inv = 127.0f / amax;
    for (int64_t c = 0; c < cols; c++) codes[c] = (int8_t)(int32_t)rintf(v[c] * inv);
    return amax / 127.0f;
}

/* Forward: gate = bf16(Sg · gate_rows[r] · gate_cols[c]), up likewise (both written out for
 * backward), h = silu(gate) · up · factor[c] quantized per row into codes / row_scale.
 * scratch: threads × cols floats. */
void offsite_swiglu_quantize(const int32_t *gate_sums, const float *gate_rows,
                             const float *gate_cols, const int32_t *up_sums,
                             const float *up_rows, const float *up_cols, const float *factor,
                             int64_t rows, int64_t cols, uint16_t *gate, uint16_t *up,
                             int8_t *codes, float *row_scale, float *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *h = scratch + (int64_t)omp_get_thread_num() * cols;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int32_t *gs = gate_sums + r * cols, *us = up_sums + r * cols;
            uint16_t *go = gate + r * cols, *uo = up + r * cols;
            float gr = gate_rows[r], ur = up_rows[r], amax = 0.0f;
#pragma omp simd reduction(max : amax)
            for (int64_t c = 0; c < cols; c++) {
                uint16_t gb = float_to_bf16(((float)gs[c] * gr) * gate_cols[c]);
                uint16_t ub = float_to_bf16(((float)us[c] * ur) * up_cols[c]);
                go[c] = gb;
                uo[c] = ub;
                float g = bf16_to_float(gb);
                float v = (g * sigmoid(g)) * bf16_to_float(ub) * factor[c];
                h[c] = v;
                v = fabsf(v);
                amax = v > amax ? v : amax;
            }
            row_scale[r] = quantize_row(h, cols, amax, codes + r * cols);
        }
    }
}

/* Backward: dh = Sd · rows[r] · factor[c] (the product's gradient), then
 * d_gate = dh · up · σ(g) · (1 + g · (1 − σ(g))) and d_up = dh · silu(g), each times its
 * layer's weight scale (gate_cols / up_cols) and quantized per row for the input-gradient
 * matmuls. scratch: threads × 2 · cols floats. */
void offsite_swiglu_backward_quantize(const int32_t *sums, const float *sum_rows,
                                      const float *factor, const uint16_t *gate,
                                      const uint16_t *up, const float *gate_cols,
                                      const float *up_cols, int64_t rows, int64_t cols,
                                      int8_t *gate_codes, float *gate_scale, int8_t *up_codes,
                                      float *up_scale, float *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *dg = scratch + (int64_t)omp_get_thread_num() * 2 * cols, *du = dg + cols;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int32_t *sr = sums + r * cols;
            const uint16_t *gr = gate + r * cols, *ur = up + r * cols;
            float rs = sum_rows[r], gmax = 0.0f, umax = 0.0f;
#pragma omp simd reduction(max : gmax, umax)
            for (int64_t c = 0; c < cols; c++) {
                float dh = ((float)sr[c] * rs) * factor[c];
                float g = bf16_to_float(gr[c]), s = sigmoid(g);
                float a = ((dh * bf16_to_float(ur[c])) * s) * (1.0f + g * (1.0f - s));
                float b = (dh * (g * s));
                a *= gate_cols[c];
                b *= up_cols[c];
                dg[c] = a;
                du[c] = b;
                a = fabsf(a);
                b = fabsf(b);
                gmax = a > gmax ? a : gmax;
                umax = b > umax ? b : umax;
            }
            gate_scale[r] = quantize_row(dg, cols, gmax, gate_codes + r * cols);
            up_scale[r] = quantize_row(du, cols, umax, up_codes + r * cols);
        }
    }
}

/* out[r, c] = bf16((a · a_rows[r]) · a_cols[c] + (b · b_rows[r]) · b_cols[c]): the input
 * gradient through gate and up, summed in fp32 and rounded once. */
void offsite_dequantize_sum_bf16(const int32_t *a, const float *a_rows, const float *a_cols,
                                 const int32_t *b, const float *b_rows, const float *b_cols,
                                 int64_t rows, int64_t cols, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *ar = a + r * cols, *br = b + r * cols;
        uint16_t *orow = out + r * cols;
        float as = a_rows[r], bs = b_rows[r];
        for (int64_t c = 0; c < cols; c++)
            orow[c] = float_to_bf16(((float)ar[c] * as) * a_cols[c] + ((float)br[c] * bs) * b_cols[c]);
    }
}

/* ---- Llama-style RMS norm of an fp32 residual stream under bf16 autocast ----
 * (client/kernels/rms_norm.py) One pass each way instead of torch's six to eight; the row's
 * mean square is summed in a different order than torch's, so rstd may differ in its last bit. */

/* rstd[r] = 1 / sqrt(mean_c x² + eps), normed = bf16(x · rstd) (kept for backward),
 * out = weight[c] · (x · rstd) */
void offsite_rms_norm(const float *x, const float *weight, int64_t rows, int64_t cols, float eps,
                      float *out, uint16_t *normed, float *rstd, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *orow = out + r * cols;
        uint16_t *nrow = normed + r * cols;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t c = 0; c < cols; c++) squares += xr[c] * xr[c];
        float s = 1.0f / sqrtf(squares / (float)cols + eps);
        rstd[r] = s;
        for (int64_t c = 0; c < cols; c++) {
            float v = xr[c] * s;
            nrow[c] = float_to_bf16(v);
            orow[c] = weight[c] * v;
        }
    }
}

/* dx = rstd · (g − x̂ · mean_c(g · x̂)), g = dy · weight, x̂ the kept bf16 normed rows */
void offsite_rms_norm_backward(const float *dy, const uint16_t *normed, const float *rstd,
                               const float *weight, int64_t rows, int64_t cols, float *dx,
                               int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = dy + r * cols;
        const uint16_t *nrow = normed + r * cols;
        float *drow = dx + r * cols;
        float inner = 0.0f;
#pragma omp simd reduction(+ : inner)
        for (int64_t c = 0; c < cols; c++) inner += (gr[c] * weight[c]) * bf16_to_float(nrow[c]);
        inner /= (float)cols;
        float s = rstd[r];
        for (int64_t c = 0; c < cols; c++)
            drow[c] = ((gr[c] * weight[c]) - bf16_to_float(nrow[c]) * inner) * s;
    }
}

/* ---- rotary position embedding of one projection, into attention's head-major layout ----
 * (client/kernels/rotary.py) x: [batch, length, heads · dim] bf16 (a linear's output);
 * cos, sin: [table_batch (1 or batch), table_length, dim] fp32, read at positions
 * offset + t. The arithmetic is that of ``q·cos + rotate_half(q)·sin`` with a bf16 q and fp32
 * tables followed by a cast to bf16, and of its autograd backward, operation for operation,
 * so both give the same bits as those torch ops. */

static inline const float *table_row(const float *table, int64_t b, int64_t t,
                                     int64_t table_batch, int64_t table_length, int64_t offset,
                                     int64_t dim) {
    return table + ((table_batch == 1 ? 0 : b) * table_length + offset + t) * dim;
}

/* One pass over every (batch, position, head) row of dim values: forward reads x in
 * [batch, length, heads · dim] and writes out in [batch, heads, length, dim]; backward reads
 * the gradient in the head-major layout and writes the row-major one. */
static void rotary_pass(const uint16_t *in, const float *cos, const float *sin, int64_t batch,
                        int64_t length, int64_t heads, int64_t dim, int64_t table_batch,
                        int64_t table_length, int64_t offset, uint16_t *out, int threads,
                        int backward) {
    int64_t half = dim / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < length; t++) {
            const float *c = table_row(cos, b, t, table_batch, table_length, offset, dim);
            const float *s = table_row(sin, b, t, table_batch, table_length, offset, dim);
            for (int64_t h = 0; h < heads; h++) {
                int64_t row_major = ((b * length + t) * heads + h) * dim;
                int64_t head_major = ((b * heads + h) * length + t) * dim;
                const uint16_t *v = in + (backward ? head_major : row_major);
                uint16_t *o = out + (backward ? row_major : head_major);
                if (!backward) {
                    /* out = bf16(q·cos + rotate_half(q)·sin) */
                    for (int64_t d = 0; d < half; d++) {
                        float q1 = bf16_to_float(v[d]), q2 = bf16_to_float(v[d + half]);
                        o[d] = float_to_bf16(q1 * c[d] + (-q2) * s[d]);
                        o[d + half] = float_to_bf16(q2 * c[d + half] + q1 * s[d + half]);
                    }
                    continue;
                }
                /* each path rounded to bf16 as autograd does (the fp32 products cast back to
                 * q's dtype), then summed in bf16 */
                for (int64_t d = 0; d < half; d++) {
                    float g1 = bf16_to_float(v[d]), g2 = bf16_to_float(v[d + half]);
                    float direct1 = bf16_to_float(float_to_bf16(g1 * c[d]));
                    float direct2 = bf16_to_float(float_to_bf16(g2 * c[d + half]));
                    float rotated1 = bf16_to_float(float_to_bf16(g2 * s[d + half]));
                    float rotated2 = -bf16_to_float(float_to_bf16(g1 * s[d]));
                    o[d] = float_to_bf16(direct1 + rotated1);
                    o[d + half] = float_to_bf16(direct2 + rotated2);
                }
            }
        }
    }
}

/* out[b, h, t, :] = bf16(q·cos + rotate_half(q)·sin), q = x[b, t, h·dim : (h+1)·dim] */
void offsite_rotary_heads(const uint16_t *x, const float *cos, const float *sin, int64_t batch,
                          int64_t length, int64_t heads, int64_t dim, int64_t table_batch,
                          int64_t table_length, int64_t offset, uint16_t *out, int threads) {
    rotary_pass(x, cos, sin, batch, length, heads, dim, table_batch, table_length, offset, out,
                threads, 0);
}

/* The gradient of x from that of out (both bf16). */
void offsite_rotary_heads_backward(const uint16_t *grad, const float *cos, const float *sin,
                                   int64_t batch, int64_t length, int64_t heads, int64_t dim,
                                   int64_t table_batch, int64_t table_length, int64_t offset,
                                   uint16_t *dx, int threads) {
    rotary_pass(grad, cos, sin, batch, length, heads, dim, table_batch, table_length, offset, dx,
                threads, 1);
}
