// What our C++ kernels (trainer/*_kernel.cpp) share: 16-float vectors written with GCC/Clang vector
// extensions rather than intrinsics (the compiler emits whichever vector instructions -march=native
// allows: AVX-512, AVX2, NEON), and the bf16 <-> float32 conversions torch makes.
//
// bf16 values travel as uint16_t (the top half of a float32); widening is exact, and narrowing rounds to
// nearest even with NaN kept a quiet NaN, as torch rounds a float32 to bf16. trainer/native.py builds each
// kernel with this folder on the include path and counts this file in every kernel's cache key.

#pragma once

#include <cstdint>
#include <cstring>

namespace kernel {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

inline vf splat(float x) { return vf{} + x; }

inline vf load(const float *p) {
    vf f;
    std::memcpy(&f, p, sizeof f);
    return f;
}
inline vf load(const uint16_t *p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline void store(float *p, vf f) { std::memcpy(p, &f, sizeof f); }
inline void store(uint16_t *p, vf f) {
    vu u;
    std::memcpy(&u, &f, sizeof u);
    vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    vu nan = (vu)(f != f);  // a true comparison is all ones
    rounded = (rounded & ~nan) | (0x7FC0u & nan);
    vh h = __builtin_convertvector(rounded, vh);
    std::memcpy(p, &h, sizeof h);
}

// One element: the same conversions as the vectors' (tails of rows that are not a whole vector).
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline void store_one(float *p, float f) { *p = f; }
inline void store_one(uint16_t *p, float f) {
    uint16_t h[W];
    store(h, splat(f));
    *p = h[0];
}

// f as the dtype T would hold it, widened back: what a float32 result becomes when torch stores it in T.
inline vf as_stored(vf f, const float *) { return f; }
inline vf as_stored(vf f, const uint16_t *) {
    uint16_t h[W];
    store(h, f);
    return load(h);
}
inline float as_stored(float f, const float *) { return f; }
inline float as_stored(float f, const uint16_t *p) { return as_stored(splat(f), p)[0]; }

// The first n (<= W) elements at p as a vector, zeros after them; and back: the tails of rows that are
// not a whole number of vectors go through the same vector code.
template <typename T>
inline vf load_n(const T *p, int64_t n) {
    if (n == W) return load(p);
    T part[W] = {};
    std::memcpy(part, p, n * sizeof(T));
    return load(part);
}
template <typename T>
inline void store_n(T *p, vf f, int64_t n) {
    if (n == W) return store(p, f);
    T part[W];
    store(part, f);
    std::memcpy(p, part, n * sizeof(T));
}

// e^x for any float32 x: x = n ln2 + t with |t| <= ln2 / 2 (ln 2 in two parts, so t is exact),
// e^t by its degree-7 Taylor polynomial (relative error under 5e-9, below float32's rounding step of
// 6e-8), 2^n put into the exponent bits. Clamped to [e^-87.3, e^88.7]: the smallest normal float and
// the largest finite one, so 1 / (1 + e^-x) is 0 or 1 at the ends, as torch's sigmoid is.
inline vf exp_any(vf input) {
    vf x = input < -87.3f ? splat(-87.3f) : input;
    x = x > 88.7f ? splat(88.7f) : x;
    vf n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 drops the fraction
    vf t = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
    vf p = t * (1.0f / 5040) + 1.0f / 720;
    p = p * t + 1.0f / 120;
    p = p * t + 1.0f / 24;
    p = p * t + 1.0f / 6;
    p = p * t + 0.5f;
    p = p * t + 1.0f;
    p = p * t + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline float reduce_sum(vf v) {
    float s = 0;
    for (int i = 0; i < W; i++) s += v[i];
    return s;
}

}  // namespace kernel
