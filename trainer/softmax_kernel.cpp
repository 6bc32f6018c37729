// The blockwise attention's masked softmax in one pass per score row (trainer/softmax_kernel.py builds
// this with the machine's C++ compiler, -O3 -march=native -fopenmp, and loads it with ctypes).
//
// Forward: p = softmax(s + mask) over each row, written over s, and the row's log-sum-exp kept.
// Backward: p = exp(s + mask - lse) from the recomputed scores and the kept log-sum-exp: one
// exponential per score instead of a whole softmax (max, exponential, sum, division).
// Scores and mask are bf16 (as uint16_t) or float32; every sum and exponential is float32, and the
// result is rounded once, as torch's CPU softmax rounds it.
//
// Written with the vector extensions of trainer/kernel_common.h, 16 floats per vector.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernel_common.h"

namespace {

using namespace kernel;

// e^x for x <= 0 as 2^t, t = x log2(e) = n + f with |f| <= 1/2: 2^f by its degree-5 Taylor polynomial
// (relative error under 3e-6, far below bf16's rounding step of 4e-3), 2^n put into the exponent
// bits. x below -87 (where 2^n would leave float32's normal range) gives exactly 0, as torch's
// softmax gives a masked key.
inline vf exp_nonpositive(vf input) {
    vf x = input > -87.0f ? input : splat(-87.0f);
    vf t = x * 1.4426950408889634f;
    vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 drops the fraction bits
    vf f = t - n;
    vf p = f * 1.3333558146e-3f + 9.6181291076e-3f;  // (ln 2)^k / k!
    p = p * f + 5.5504108665e-2f;
    p = p * f + 2.4022650696e-1f;
    p = p * f + 6.9314718056e-1f;
    p = p * f + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return input > -87.0f ? p * scale : vf{};
}

inline float reduce_max(vf v) {
    float m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
}
// The last keys % W values of a row, padded to a whole vector (zeros: their results are dropped).
template <typename T>
struct Tail {
    T s[W] = {}, m[W] = {};
    int n;
    Tail(const T *sp, const T *mp, int count) : n(count) {
        std::memcpy(s, sp, n * sizeof(T));
        std::memcpy(m, mp, n * sizeof(T));
    }
};

// One row: buf holds its float32 values between the passes (keys rounded up to W).
template <typename T>
void softmax_row(T *s, const T *m, float *buf, int64_t keys, float *lse) {
    const int64_t full = keys / W * W, padded = (keys + W - 1) / W * W;
    vf top = splat(-INFINITY);
    for (int64_t k = 0; k < full; k += W) {
        vf x = load(s + k) + load(m + k);
        std::memcpy(buf + k, &x, sizeof x);
        top = x > top ? x : top;
    }
    float mx = reduce_max(top);
    if (full < keys) {
        Tail<T> t(s + full, m + full, int(keys - full));
        vf x = load(t.s) + load(t.m);
        for (int i = 0; i < t.n; i++) {
            buf[full + i] = x[i];
            mx = x[i] > mx ? x[i] : mx;
        }
    }
    vf sum = {};
    for (int64_t k = 0; k < padded; k += W) {
        vf e = exp_nonpositive(load(buf + k) - mx);
        for (int64_t i = keys - k; i < W; i++) e[i] = 0.0f;  // the tail's padding
        std::memcpy(buf + k, &e, sizeof e);
        sum += e;
    }
    const float total = reduce_sum(sum), inverse = 1.0f / total;
    for (int64_t k = 0; k < full; k += W) store(s + k, load(buf + k) * inverse);
    if (full < keys) {
        T out[W];
        store(out, load(buf + full) * inverse);
        std::memcpy(s + full, out, (keys - full) * sizeof(T));
    }
    *lse = mx + std::log(total);
}

template <typename T>
void exp_row(T *s, const T *m, int64_t keys, float lse) {
    const int64_t full = keys / W * W;
    for (int64_t k = 0; k < full; k += W) store(s + k, exp_nonpositive(load(s + k) + load(m + k) - lse));
    if (full < keys) {
        Tail<T> t(s + full, m + full, int(keys - full));
        T out[W];
        store(out, exp_nonpositive(load(t.s) + load(t.m) - lse));
        std::memcpy(s + full, out, t.n * sizeof(T));
    }
}

// scores: (batch * kv, rows * group, keys), contiguous, row r * group + j of head i being query
// position r of query head j of KV head i % kv; its mask row is mask + (i / kv) * mask_batch + r * mask_row
// (the mask's keys contiguous). lse: one float per score row.
struct Shape {
    int64_t batch, kv, rows, group, keys, mask_batch, mask_row;
    int64_t total() const { return batch * kv * rows * group; }
    int64_t mask_offset(int64_t i) const {
        const int64_t per = rows * group;
        return (i / per / kv) * mask_batch + (i % per) / group * mask_row;
    }
};

template <typename T>
void softmax_all(T *scores, const T *mask, float *lse, const Shape &shape, int threads) {
    const int64_t padded = (shape.keys + W - 1) / W * W;
#pragma omp parallel num_threads(threads)
    {
        float *buf = static_cast<float *>(std::aligned_alloc(64, padded * sizeof(float)));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < shape.total(); i++)
            softmax_row(scores + i * shape.keys, mask + shape.mask_offset(i), buf, shape.keys, lse + i);
        std::free(buf);
    }
}

template <typename T>
void exp_all(T *scores, const T *mask, const float *lse, const Shape &shape, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < shape.total(); i++)
        exp_row(scores + i * shape.keys, mask + shape.mask_offset(i), shape.keys, lse[i]);
}

}  // namespace

#define SHAPE_ARGS int64_t batch, int64_t kv, int64_t rows, int64_t group, int64_t keys, int64_t mask_batch, \
                   int64_t mask_row, int threads
#define SHAPE Shape{batch, kv, rows, group, keys, mask_batch, mask_row}, threads

extern "C" {
void masked_softmax_bf16(uint16_t *s, const uint16_t *m, float *lse, SHAPE_ARGS) { softmax_all(s, m, lse, SHAPE); }
void masked_softmax_f32(float *s, const float *m, float *lse, SHAPE_ARGS) { softmax_all(s, m, lse, SHAPE); }
void masked_exp_bf16(uint16_t *s, const uint16_t *m, const float *lse, SHAPE_ARGS) { exp_all(s, m, lse, SHAPE); }
void masked_exp_f32(float *s, const float *m, const float *lse, SHAPE_ARGS) { exp_all(s, m, lse, SHAPE); }
}
