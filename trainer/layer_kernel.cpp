// The element-wise work of a Llama-style decoder layer, forward and backward, one pass each
// (trainer/layer_kernel.py builds this with the machine's C++ compiler, -O3 -march=native -fopenmp,
// and loads it with ctypes):
// - RMSNorm: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row; keeps r for backward.
// - SwiGLU: h = silu(g) * u; backward from g and u alone (silu(g) is not kept).
// - rotary embedding: out = x * cos + rotate_half(x) * sin per head; backward is the same rotation
//   transposed.
// Every sum and product is float32; a bf16 result is rounded where torch's operators round it (the
// normalised x before the weight's product, silu(g) before the product with u), so the values equal
// the model's own forward to the last bit or two (float32's order of summation differs).

#include <cmath>

#include "kernel_common.h"

namespace {

using namespace kernel;

inline int64_t piece(int64_t width, int64_t k) { return width - k < W ? width - k : W; }

template <typename T>
void rms_norm_forward(const T *x, const T *w, T *y, float *rstd, int64_t rows, int64_t width, float eps,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; i++) {
        const T *xi = x + i * width;
        T *yi = y + i * width;
        vf squares = {};
        for (int64_t k = 0; k < width; k += W) {
            vf v = load_n(xi + k, piece(width, k));
            squares += v * v;
        }
        const float r = 1.0f / std::sqrt(reduce_sum(squares) / (float)width + eps);
        rstd[i] = r;
        for (int64_t k = 0; k < width; k += W) {
            const int64_t n = piece(width, k);
            store_n(yi + k, load_n(w + k, n) * as_stored(load_n(xi + k, n) * r, x), n);
        }
    }
}

// dx = r * g - x * r^3 * sum(g * x) / width, g = dy * w; dw = sum over rows of dy * (x * r) when dw is not
// null (float32, width values, overwritten), in a pass of its own over columns, each summed over the
// rows in order: the same bits with any number of threads.
template <typename T>
void rms_norm_backward(const T *x, const T *w, const float *rstd, const T *dy, T *dx, float *dw, int64_t rows,
                       int64_t width, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; i++) {
        const T *xi = x + i * width, *dyi = dy + i * width;
        T *dxi = dx + i * width;
        const float r = rstd[i];
        vf dots = {};
        for (int64_t k = 0; k < width; k += W) {
            const int64_t n = piece(width, k);
            dots += load_n(dyi + k, n) * load_n(w + k, n) * load_n(xi + k, n);
        }
        const float c = reduce_sum(dots) * r * r * r / (float)width;
        for (int64_t k = 0; k < width; k += W) {
            const int64_t n = piece(width, k);
            store_n(dxi + k, load_n(dyi + k, n) * load_n(w + k, n) * r - load_n(xi + k, n) * c, n);
        }
    }
    if (!dw) return;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < width; k += W) {
        const int64_t n = piece(width, k);
        vf sum = {};
        for (int64_t i = 0; i < rows; i++)
            sum += load_n(dy + i * width + k, n) * as_stored(load_n(x + i * width + k, n) * rstd[i], x);
        store_n(dw + k, sum, n);
    }
}

// silu(g) = g / (1 + e^-g), as torch computes it, stored in T.
template <typename T>
inline vf silu(vf g, const T *as) {
    return as_stored(g / (1.0f + exp_any(-g)), as);
}

template <typename T>
void swiglu_forward(const T *g, const T *u, T *h, int64_t count, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < count; k += W) {
        const int64_t n = piece(count, k);
        store_n(h + k, silu(load_n(g + k, n), g) * load_n(u + k, n), n);
    }
}

// du = dh * silu(g); dg = (dh * u) * s * (1 + g * (1 - s)), s = sigmoid(g): torch's silu backward.
template <typename T>
void swiglu_backward(const T *g, const T *u, const T *dh, T *dg, T *du, int64_t count, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < count; k += W) {
        const int64_t n = piece(count, k);
        vf gv = load_n(g + k, n), dhv = load_n(dh + k, n);
        vf s = 1.0f / (1.0f + exp_any(-gv));
        store_n(du + k, dhv * silu(gv, g), n);
        store_n(dg + k, as_stored(dhv * load_n(u + k, n), g) * s * (1.0f + gv * (1.0f - s)), n);
    }
}

// x: (rows, heads, dim), cos and sin: (rows, dim), contiguous. Forward, per head (halves 1 and 2):
// out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (x cos + rotate_half(x) sin); backward, the transpose:
// out1 = x1 c1 + x2 s2, out2 = x2 c2 - x1 s1.
template <typename T>
void rotary(const T *x, const T *cos, const T *sin, T *out, int64_t rows, int64_t heads, int64_t dim,
            bool backward, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows * heads; i++) {
        const T *xi = x + i * dim, *c = cos + i / heads * dim, *s = sin + i / heads * dim;
        T *oi = out + i * dim;
        for (int64_t k = 0; k < half; k += W) {
            const int64_t n = piece(half, k);
            vf x1 = load_n(xi + k, n), x2 = load_n(xi + half + k, n);
            vf c1 = load_n(c + k, n), c2 = load_n(c + half + k, n);
            vf s1 = load_n(s + k, n), s2 = load_n(s + half + k, n);
            if (backward) {
                store_n(oi + k, x1 * c1 + x2 * s2, n);
                store_n(oi + half + k, x2 * c2 - x1 * s1, n);
            } else {  // each product stored in T before the sum, as torch's operators store them
                store_n(oi + k, as_stored(x1 * c1, x) + as_stored(-x2 * s1, x), n);
                store_n(oi + half + k, as_stored(x2 * c2, x) + as_stored(x1 * s2, x), n);
            }
        }
    }
}

}  // namespace

// The C entry points, one per function and dtype (bf16 as uint16_t).
#define ENTRY_POINTS(suffix, T)                                                                                    \
    void rms_norm_forward_##suffix(const T *x, const T *w, T *y, float *rstd, int64_t rows, int64_t width,         \
                                   float eps, int threads) {                                                       \
        rms_norm_forward(x, w, y, rstd, rows, width, eps, threads);                                               \
    }                                                                                                              \
    void rms_norm_backward_##suffix(const T *x, const T *w, const float *rstd, const T *dy, T *dx, float *dw,      \
                                    int64_t rows, int64_t width, int threads) {                                    \
        rms_norm_backward(x, w, rstd, dy, dx, dw, rows, width, threads);                                          \
    }                                                                                                              \
    void swiglu_forward_##suffix(const T *g, const T *u, T *h, int64_t count, int threads) {                     \
        swiglu_forward(g, u, h, count, threads);                                                                   \
    }                                                                                                              \
    void swiglu_backward_##suffix(const T *g, const T *u, const T *dh, T *dg, T *du, int64_t count, int threads) { \
        swiglu_backward(g, u, dh, dg, du, count, threads);                                                         \
    }                                                                                                              \
    void rotary_##suffix(const T *x, const T *cos, const T *sin, T *out, int64_t rows, int64_t heads, int64_t dim, \
                         int backward, int threads) {                                                              \
        rotary(x, cos, sin, out, rows, heads, dim, backward != 0, threads);                                        \
    }

extern "C" {
ENTRY_POINTS(f32, float)
ENTRY_POINTS(bf16, uint16_t)
}
