// Causal attention of one sequence, forward and backward, flash-style (trainer/flash_kernel.py builds this
// with -O3 -march=native -fopenmp and loads it with ctypes):
// - scores are computed a tile of 64 queries x 128 keys at a time and never kept: forward keeps each row's
//   running maximum and sum (online softmax) and returns the row's log-sum-exp; backward recomputes each
//   tile's probabilities from it.
// - both matrix products of a tile are register-blocked loops the compiler vectorizes: scores as 8 x 32
//   blocks of D-long sums over keys packed in panels of 32 (transposed, read in order), the weighted sums
//   of values (and the gradients' products) as 4 rows x 64 columns kept in 16 vector registers.
// - grouped query heads read their K/V head; backward runs one task per K/V head and key tile, summing dK
//   and dV over the group's query heads itself, and dQ in one float32 buffer per thread; the tasks are
//   dealt round-robin, so the sums' order, and the result to the bit, depends on the thread count only.
// Inputs and outputs are bf16 or float32 with any head and row strides (the last dimension contiguous):
// the model's (B, L, H, D) projections are read and written in place. Every sum is float32.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>

#include "kernel_common.h"

namespace {

using namespace kernel;

constexpr int BQ = 64;   // queries per tile
constexpr int BK = 128;  // keys per tile
constexpr int PANEL = 2 * W;  // keys per packed panel (one 8 x 32 register block)
constexpr float NEG = -INFINITY;

// e^x for x <= 0 (scores less their row's maximum or log-sum-exp), 0 below -87.3, where a float32
// probability no longer adds to a row's sum.
inline vf exp_neg(vf x) { return x < -87.3f ? splat(0.0f) : exp_any(x); }

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Scratch floats, left uninitialized (every element used is written first): a zero-filled std::vector
// would write the ~10 MB of a 1,024-token call's scratch twice.
struct Buffer {
    std::unique_ptr<float[]> memory;
    explicit Buffer(int64_t n = 0) : memory(n ? new float[n] : nullptr) {}
    float *data() const { return memory.get(); }
};

// One tensor's layout: element (head, row, d) at data[head * head_stride + row * row_stride + d].
template <typename T>
struct View {
    T *data;
    int64_t head_stride, row_stride;
    T *row(int64_t head, int64_t r) const { return data + head * head_stride + r * row_stride; }
};

// s[r][c] = scale * sum_d a[r][d] * b[c][d] for r < 64, c < cols (a multiple of 32): a (64, D) contiguous,
// b packed by pack_panels; s (64, BK).
template <int D>
void dot_tile(const float *a, const float *b, float *s, int64_t cols, float scale) {
    for (int r0 = 0; r0 < BQ; r0 += 8) {
        for (int64_t c0 = 0; c0 < cols; c0 += PANEL) {
            const float *panel = b + c0 * D;
            vf acc[8][2] = {};
            for (int d = 0; d < D; d++) {
                const vf b0 = load(panel + d * PANEL), b1 = load(panel + d * PANEL + W);
                for (int r = 0; r < 8; r++) {
                    const float x = a[(r0 + r) * D + d];
                    acc[r][0] += x * b0;
                    acc[r][1] += x * b1;
                }
            }
            for (int r = 0; r < 8; r++) {
                store(s + (r0 + r) * BK + c0, acc[r][0] * scale);
                store(s + (r0 + r) * BK + c0 + W, acc[r][1] * scale);
            }
        }
    }
}

// c[i][0:64] += sum_j p(i, j) * x[j][0:64] for i < rows (a multiple of 4), j < inner; p(i, j) = p[i * PS_I +
// j * PS_J]; x and c with row stride LD. Four rows of c stay in 16 named registers (GCC spills an array of
// vectors indexed in loops to the stack, at half the speed).
template <int LD, int PS_I, int PS_J>
void accumulate64(const float *p, const float *x, float *c, int64_t rows, int64_t inner) {
    for (int64_t i0 = 0; i0 < rows; i0 += 4) {
        float *c0 = c + i0 * LD, *c1 = c0 + LD, *c2 = c1 + LD, *c3 = c2 + LD;
        vf a00 = load(c0), a01 = load(c0 + W), a02 = load(c0 + 2 * W), a03 = load(c0 + 3 * W);
        vf a10 = load(c1), a11 = load(c1 + W), a12 = load(c1 + 2 * W), a13 = load(c1 + 3 * W);
        vf a20 = load(c2), a21 = load(c2 + W), a22 = load(c2 + 2 * W), a23 = load(c2 + 3 * W);
        vf a30 = load(c3), a31 = load(c3 + W), a32 = load(c3 + 2 * W), a33 = load(c3 + 3 * W);
        const float *pi = p + i0 * PS_I;
        for (int64_t j = 0; j < inner; j++) {
            const float *xj = x + j * LD;
            const vf x0 = load(xj), x1 = load(xj + W), x2 = load(xj + 2 * W), x3 = load(xj + 3 * W);
            const float *pj = pi + j * PS_J;
            const float s0 = pj[0], s1 = pj[PS_I], s2 = pj[2 * PS_I], s3 = pj[3 * PS_I];
            a00 += s0 * x0; a01 += s0 * x1; a02 += s0 * x2; a03 += s0 * x3;
            a10 += s1 * x0; a11 += s1 * x1; a12 += s1 * x2; a13 += s1 * x3;
            a20 += s2 * x0; a21 += s2 * x1; a22 += s2 * x2; a23 += s2 * x3;
            a30 += s3 * x0; a31 += s3 * x1; a32 += s3 * x2; a33 += s3 * x3;
        }
        store(c0, a00); store(c0 + W, a01); store(c0 + 2 * W, a02); store(c0 + 3 * W, a03);
        store(c1, a10); store(c1 + W, a11); store(c1 + 2 * W, a12); store(c1 + 3 * W, a13);
        store(c2, a20); store(c2 + W, a21); store(c2 + 2 * W, a22); store(c2 + 3 * W, a23);
        store(c3, a30); store(c3 + W, a31); store(c3 + 2 * W, a32); store(c3 + 3 * W, a33);
    }
}

// The same over D columns, 64 at a time.
template <int D, int PS_I, int PS_J>
void accumulate(const float *p, const float *x, float *c, int64_t rows, int64_t inner) {
    for (int d = 0; d < D; d += 64) accumulate64<D, PS_I, PS_J>(p, x + d, c + d, rows, inner);
}

// Each head of x as float32 (heads, rows, D), rows from n on zero.
template <int D, typename T>
void widen_heads(View<const T> x, float *out, int64_t heads, int64_t n, int64_t rows) {
#pragma omp for schedule(static) collapse(2)
    for (int64_t h = 0; h < heads; h++)
        for (int64_t r = 0; r < rows; r++)
            for (int d = 0; d < D; d += W)
                store(out + (h * rows + r) * D + d, r < n ? load(x.row(h, r) + d) : splat(0.0f));
}

// Each head of x (float32, (heads, rows, D)) in panels of 32 rows, each transposed to (D, 32): the keys of a
// tile for dot_tile, read in order.
template <int D>
void pack_panels(const float *x, float *packed, int64_t heads, int64_t rows) {
#pragma omp for schedule(static) collapse(2)
    for (int64_t h = 0; h < heads; h++)
        for (int64_t c0 = 0; c0 < rows; c0 += PANEL) {
            const float *from = x + (h * rows + c0) * D;
            float *to = packed + (h * rows + c0) * D;
            for (int d = 0; d < D; d++)
                for (int e = 0; e < PANEL; e++) to[d * PANEL + e] = from[e * D + d];
        }
}

// A tile's probabilities from its scores, in place: exp(s - shift[r]), 0 where the key comes after the query
// or the query is padding (from n on).
void tile_probabilities(float *s, const float *shift, int64_t q0, int64_t k0, int64_t cols, int64_t n) {
    for (int r = 0; r < BQ; r++) {
        const int64_t query = q0 + r;
        float *row = s + r * BK;
        if (query >= n) {
            std::fill(row, row + cols, 0.0f);
            continue;
        }
        const vf m = splat(shift[r]);
        for (int64_t c = 0; c < cols; c += W) {
            vf x = exp_neg(load(row + c) - m);
            if (k0 + c + W - 1 > query)
                for (int e = 0; e < W; e++)
                    if (k0 + c + e > query) x[e] = 0.0f;
            store(row + c, x);
        }
    }
}

// The largest score row r's query sees in a tile (its keys up to itself), or NEG.
float row_max(const float *row, int64_t query, int64_t k0, int64_t cols) {
    const int64_t seen = std::min(cols, query - k0 + 1);
    float top = NEG;
    int64_t c = 0;
    if (seen >= W) {
        vf most = load(row);
        for (c = W; c + W <= seen; c += W) {
            const vf x = load(row + c);
            most = x > most ? x : most;
        }
        for (int e = 0; e < W; e++) top = std::max(top, most[e]);
    }
    for (; c < seen; c++) top = std::max(top, row[c]);
    return top;
}

// One query tile of one head: its output rows and log-sum-exps.
template <int D, typename T>
void forward_tile(const float *q, const float *k_packed, const float *v, View<T> o, float *lse, int64_t h,
                  int64_t q0, int64_t n, float scale, float *s, float *acc) {
    float m[BQ], l[BQ], shift[BQ];
    std::fill(acc, acc + BQ * D, 0.0f);
    std::fill(m, m + BQ, NEG);
    std::fill(l, l + BQ, 0.0f);
    const int64_t end = std::min(q0 + BQ, n);  // keys up to the tile's last query
    for (int64_t k0 = 0; k0 < end; k0 += BK) {
        const int64_t cols = round_up(std::min<int64_t>(BK, end - k0), PANEL);
        dot_tile<D>(q, k_packed + k0 * D, s, cols, scale);
        float alpha[BQ];
        for (int r = 0; r < BQ; r++) {
            const float top = q0 + r < n ? std::max(m[r], row_max(s + r * BK, q0 + r, k0, cols)) : NEG;
            shift[r] = top == NEG ? 0.0f : top;
            alpha[r] = m[r] == NEG ? 0.0f : std::exp(m[r] - top);
            m[r] = top;
        }
        tile_probabilities(s, shift, q0, k0, cols, n);
        for (int r = 0; r < BQ; r++) {
            vf sums = {};
            for (int64_t c = 0; c < cols; c += W) sums += load(s + r * BK + c);
            l[r] = l[r] * alpha[r] + reduce_sum(sums);
            if (alpha[r] != 1.0f)
                for (int d = 0; d < D; d += W) store(acc + r * D + d, load(acc + r * D + d) * alpha[r]);
        }
        accumulate<D, BK, 1>(s, v + k0 * D, acc, BQ, cols);
    }
    for (int r = 0; r < BQ && q0 + r < n; r++) {
        const float inv = 1.0f / l[r];  // every query sees itself: l >= 1
        for (int d = 0; d < D; d += W) store(o.row(h, q0 + r) + d, load(acc + r * D + d) * inv);
        lse[h * n + q0 + r] = m[r] + std::log(l[r]);
    }
}

template <int D, typename T>
void forward(View<const T> q, View<const T> k, View<const T> v, View<T> o, float *lse, int64_t heads, int64_t kv_heads,
             int64_t n, float scale, int threads) {
    const int64_t rows = round_up(n, BQ), tiles = rows / BQ, group = heads / kv_heads;
    Buffer qf(heads * rows * D), kf(kv_heads * rows * D), k_packed(kv_heads * rows * D), vf_(kv_heads * rows * D);
#pragma omp parallel num_threads(threads)
    {
        widen_heads<D>(q, qf.data(), heads, n, rows);
        widen_heads<D>(k, kf.data(), kv_heads, n, rows);
        widen_heads<D>(v, vf_.data(), kv_heads, n, rows);
        pack_panels<D>(kf.data(), k_packed.data(), kv_heads, rows);
        Buffer s(BQ * BK), acc(BQ * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < heads * tiles; task++) {
            const int64_t h = task % heads, q0 = (tiles - 1 - task / heads) * BQ;  // the longest tiles first
            const int64_t kv = h / group * rows * D;
            forward_tile<D>(qf.data() + (h * rows + q0) * D, k_packed.data() + kv, vf_.data() + kv, o, lse, h, q0, n,
                            scale, s.data(), acc.data());
        }
    }
}

// Scratch of one backward call: the inputs as padded float32, K and V packed, each row's log-sum-exp and
// delta (sum of dO * O), and a dQ per thread.
struct BackwardScratch {
    Buffer q, dout, k, k_packed, v_packed, lse, delta, dq_parts;
};

// One key tile of one K/V head against every query of its group from the tile on: its dK and dV rows,
// and its share of dQ into dq (this thread's part).
template <int D, typename T>
void backward_tile(BackwardScratch &x, View<T> dk, View<T> dv, float *dq, int64_t kv, int64_t group, int64_t k0,
                   int64_t n, int64_t rows, float scale, float *p, float *dp, float *dk_acc, float *dv_acc) {
    const int64_t cols = round_up(std::min<int64_t>(BK, n - k0), PANEL);
    std::fill(dk_acc, dk_acc + BK * D, 0.0f);
    std::fill(dv_acc, dv_acc + BK * D, 0.0f);
    const float *k_packed = x.k_packed.data() + (kv * rows + k0) * D, *v_packed = x.v_packed.data() + (kv * rows + k0) * D;
    for (int64_t h = kv * group; h < (kv + 1) * group; h++) {
        for (int64_t q0 = k0 / BQ * BQ; q0 < n; q0 += BQ) {
            const float *q = x.q.data() + (h * rows + q0) * D, *dout = x.dout.data() + (h * rows + q0) * D;
            dot_tile<D>(q, k_packed, p, cols, scale);
            tile_probabilities(p, x.lse.data() + h * rows + q0, q0, k0, cols, n);
            accumulate<D, 1, BK>(p, dout, dv_acc, cols, BQ);
            dot_tile<D>(dout, v_packed, dp, cols, 1.0f);
            for (int r = 0; r < BQ; r++) {
                const vf delta = splat(x.delta.data()[h * rows + q0 + r]);
                for (int64_t c = 0; c < cols; c += W)
                    store(p + r * BK + c, load(p + r * BK + c) * (load(dp + r * BK + c) - delta));
            }
            accumulate<D, BK, 1>(p, x.k.data() + (kv * rows + k0) * D, dq + (h * rows + q0) * D, BQ, cols);
            accumulate<D, 1, BK>(p, q, dk_acc, cols, BQ);
        }
    }
    for (int64_t c = 0; c < cols && k0 + c < n; c++)
        for (int d = 0; d < D; d += W) {
            store(dk.row(kv, k0 + c) + d, load(dk_acc + c * D + d) * scale);
            store(dv.row(kv, k0 + c) + d, load(dv_acc + c * D + d));
        }
}

template <int D, typename T>
void backward(View<const T> q, View<const T> k, View<const T> v, View<const T> o, const float *lse, View<const T> dout,
              View<T> dq, View<T> dk, View<T> dv, int64_t heads, int64_t kv_heads, int64_t n, float scale, int threads) {
    const int64_t rows = round_up(n, BQ), group = heads / kv_heads, key_tiles = (n + BK - 1) / BK;
    BackwardScratch x{Buffer(heads * rows * D), Buffer(heads * rows * D), Buffer(kv_heads * rows * D),
                      Buffer(kv_heads * rows * D), Buffer(kv_heads * rows * D), Buffer(heads * rows),
                      Buffer(heads * rows), Buffer(threads * heads * rows * D)};
    std::fill(x.lse.data(), x.lse.data() + heads * rows, 0.0f);  // padding rows: read, never used
    std::fill(x.delta.data(), x.delta.data() + heads * rows, 0.0f);
#pragma omp parallel num_threads(threads)
    {
        widen_heads<D>(q, x.q.data(), heads, n, rows);
        widen_heads<D>(dout, x.dout.data(), heads, n, rows);
        widen_heads<D>(k, x.k.data(), kv_heads, n, rows);
        pack_panels<D>(x.k.data(), x.k_packed.data(), kv_heads, rows);
        widen_heads<D>(v, x.dq_parts.data(), kv_heads, n, rows);  // V, briefly, in space dQ reuses below
        pack_panels<D>(x.dq_parts.data(), x.v_packed.data(), kv_heads, rows);
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t r = 0; r < n; r++) {
                vf sums = {};
                for (int d = 0; d < D; d += W) sums += load(dout.row(h, r) + d) * load(o.row(h, r) + d);
                x.delta.data()[h * rows + r] = reduce_sum(sums);
                x.lse.data()[h * rows + r] = lse[h * n + r];
            }
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        float *dq_mine = x.dq_parts.data() + me * heads * rows * D;
        std::fill(dq_mine, dq_mine + heads * rows * D, 0.0f);
        Buffer p(BQ * BK), dp(BQ * BK), dk_acc(BK * D), dv_acc(BK * D);
        // Tasks dealt round-robin, not to whichever thread is free: which tasks add into which thread's dQ,
        // and so the order of dQ's float32 sums, is then fixed by the thread count alone (bitwise
        // reproducible runs). The first key tiles meet the most queries; dealt in turn, both threads get
        // long and short ones.
#pragma omp for schedule(static, 1)
        for (int64_t task = 0; task < kv_heads * key_tiles; task++)
            backward_tile<D>(x, dk, dv, dq_mine, task % kv_heads, group, task / kv_heads * BK, n, rows, scale, p.data(),
                             dp.data(), dk_acc.data(), dv_acc.data());
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t r = 0; r < n; r++)
                for (int d = 0; d < D; d += W) {
                    vf total = {};
                    for (int t = 0; t < team; t++) total += load(x.dq_parts.data() + ((t * heads + h) * rows + r) * D + d);
                    store(dq.row(h, r) + d, total * scale);
                }
    }
}

template <typename T>
View<T> view(T *data, const int64_t *strides, int which) {
    return View<T>{data, strides[2 * which], strides[2 * which + 1]};
}

// The entry points' bodies: D 64 or 128, else 1 (the caller keeps torch's kernel).
template <typename T>
int forward_entry(const T *q, const T *k, const T *v, T *o, float *lse, int64_t heads, int64_t kv_heads, int64_t n,
                  int64_t dim, const int64_t *strides, float scale, int threads) {
    auto run = [&](auto d) {
        constexpr int D = decltype(d)::value;
        forward<D>(view(q, strides, 0), view(k, strides, 1), view(v, strides, 2), view(o, strides, 3), lse, heads,
                   kv_heads, n, scale, threads);
    };
    if (dim == 64) run(std::integral_constant<int, 64>{});
    else if (dim == 128) run(std::integral_constant<int, 128>{});
    else return 1;
    return 0;
}

template <typename T>
int backward_entry(const T *q, const T *k, const T *v, const T *o, const float *lse, const T *dout, T *dq, T *dk, T *dv,
                   int64_t heads, int64_t kv_heads, int64_t n, int64_t dim, const int64_t *strides, float scale,
                   int threads) {
    auto run = [&](auto d) {
        constexpr int D = decltype(d)::value;
        backward<D>(view(q, strides, 0), view(k, strides, 1), view(v, strides, 2), view(o, strides, 3), lse,
                    view(dout, strides, 4), view(dq, strides, 5), view(dk, strides, 6), view(dv, strides, 7), heads,
                    kv_heads, n, scale, threads);
    };
    if (dim == 64) run(std::integral_constant<int, 64>{});
    else if (dim == 128) run(std::integral_constant<int, 128>{});
    else return 1;
    return 0;
}

}  // namespace

// The C entry points, one per dtype (bf16 as uint16_t). strides: (head, row) of q, k, v, o, and in backward
// of dout, dq, dk, dv after them; lse (heads, n) float32 contiguous.
#define ENTRY_POINTS(suffix, T)                                                                                      \
    int flash_forward_##suffix(const T *q, const T *k, const T *v, T *o, float *lse, int64_t heads, int64_t kv_heads, \
                               int64_t n, int64_t dim, const int64_t *strides, float scale, int threads) {           \
        return forward_entry(q, k, v, o, lse, heads, kv_heads, n, dim, strides, scale, threads);                     \
    }                                                                                                                \
    int flash_backward_##suffix(const T *q, const T *k, const T *v, const T *o, const float *lse, const T *dout,      \
                                T *dq, T *dk, T *dv, int64_t heads, int64_t kv_heads, int64_t n, int64_t dim,         \
                                const int64_t *strides, float scale, int threads) {                                  \
        return backward_entry(q, k, v, o, lse, dout, dq, dk, dv, heads, kv_heads, n, dim, strides, scale, threads);  \
    }

extern "C" {
ENTRY_POINTS(f32, float)
ENTRY_POINTS(bf16, uint16_t)
}
