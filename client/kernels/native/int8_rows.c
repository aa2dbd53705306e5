/* Per-row int8 quantization and scaled dequantization around torch._int_mm (see native.py).
 *
 * Both loops are written so that the compiler vectorizes them (bf16 <-> fp32 as bit shifts,
 * the row maximum as an OpenMP SIMD reduction, rintf without errno) and run rows in parallel
 * on the OpenMP runtime torch itself loaded. The arithmetic is exactly that of
 * client/kernels/int8_matmul.py's torch fallback, in the same order, so both give the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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
