// LoRA dropout in one pass: y = x * m, m = 0 or `scale` per element, the mask drawn from a
// counter-based generator (trainer/dropout_kernel.py builds this with the machine's C++ compiler,
// -O3 -march=native -fopenmp, and loads it with ctypes).
//
// The generator is SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
// generators", OOPSLA 2014; Java's SplittableRandom): the j-th 64-bit draw of a stream is a fixed
// mix of start + (j + 1) * GAMMA, so any element's draw is computed from its index alone. Each draw
// gives two elements 32 bits each; an element is kept when its 32 bits are at or above
// `threshold` = round(p * 2^32). Hence:
// - the mask depends on the seed and the element's index only, never on the thread count or how the
//   work is split, so a run is reproducible on any machine of any size;
// - the backward applies the same function to the gradient, the mask drawn again rather than kept
//   (no mask in memory between forward and backward).
// The product x * m is float32's own (a NaN or infinite input stays NaN where dropped, as in torch's
// dropout, which multiplies by its mask too); bf16 values are widened, multiplied and rounded to
// nearest even once, as torch rounds a bf16 product.
//
// Written with the vector extensions of trainer/kernel_common.h, as trainer/softmax_kernel.cpp.

#include <cstdint>
#include <cstring>

#include "kernel_common.h"

namespace {

using namespace kernel;  // W = 16 elements per vector: eight 64-bit draws

typedef uint64_t vq __attribute__((vector_size(64)));

constexpr uint64_t GAMMA = 0x9e3779b97f4a7c15ULL;  // SplitMix64's increment (the golden ratio)

inline uint64_t mix(uint64_t z) {  // SplitMix64's output function (Stafford's "Mix13")
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
inline vq mix(vq z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// The scaled mask of the W elements from `first` (a multiple of W): element i takes half i % 2 of draw
// i / 2 (little-endian, so a draw's low half is the even element), as one vector of floats.
inline vf mask(uint64_t start, int64_t first, uint32_t threshold, float scale) {
    vq j = vq{0, 1, 2, 3, 4, 5, 6, 7} + (uint64_t)(first / 2 + 1);
    vq draws = mix(start + j * GAMMA);
    vu halves;
    std::memcpy(&halves, &draws, sizeof halves);
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &scale, sizeof scale_bits);
    vu bits = (vu)(halves >= threshold) & scale_bits;  // a true comparison is all ones
    vf m;
    std::memcpy(&m, &bits, sizeof m);
    return m;
}

inline float mask_one(uint64_t start, int64_t i, uint32_t threshold, float scale) {
    uint64_t draw = mix(start + (uint64_t)(i / 2 + 1) * GAMMA);
    uint32_t half = (uint32_t)(i % 2 ? draw >> 32 : draw);
    return half >= threshold ? scale : 0.0f;
}

template <typename T>
void apply(const T *x, T *y, int64_t n, uint64_t seed, uint32_t threshold, float scale, int threads) {
    const uint64_t start = mix(seed);  // nearby seeds start far apart
    const int64_t whole = n / W;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t v = 0; v < whole; ++v) {
        const int64_t first = v * W;
        store(y + first, load(x + first) * mask(start, first, threshold, scale));
    }
    for (int64_t i = whole * W; i < n; ++i) {
        store_one(y + i, widen(x[i]) * mask_one(start, i, threshold, scale));
    }
}

}  // namespace

extern "C" {

// y = x * mask over n contiguous elements (y may be x); the mask's elements are 0 or `scale`.
void dropout_f32(const float *x, float *y, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                 int threads) {
    apply(x, y, n, seed, threshold, scale, threads);
}

void dropout_bf16(const uint16_t *x, uint16_t *y, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                  int threads) {
    apply(x, y, n, seed, threshold, scale, threads);
}

}  // extern "C"
