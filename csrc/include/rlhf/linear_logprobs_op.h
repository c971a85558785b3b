// Fused LM head + token log-probabilities + entropy: the host side of the linear_logprobs
// ops, written once for both devices (argument checks, tiling, matmuls, gradient
// accumulation), templated on the device epilogue E of the CPU (csrc/cpu/linear_logprobs.cpp)
// and CUDA (csrc/cuda/linear_logprobs.cu) ops.
//
// logits = hidden @ weight^T (+ bias), s = logits / T, never held as [N, V]. hidden may have
// any leading shape [..., H] (N = its numel / H rows; labels and the per-position outputs have
// the leading shape). The vocabulary is walked in tiles of vc columns and the tokens in blocks
// of nt rows. Each tile's logits [nt, vc] come from one matmul with float32 output (MKL on
// float32 operands on the CPU; cuBLAS with float32 accumulation and output on CUDA, so
// bf16/fp16 logits are never rounded to 16 bits) into one reused buffer, and a device epilogue
// E folds them at once, bias added, into per-row statistics (rlhf/logprobs.h):
//   forward:  running (m, d, w, s_y) per row, merged tile by tile; at the end
//             logp = (s_y - m) - log d, H = log d - w / d; saved: stats (m, log d), H.
//             A label outside [0, V) other than ignore_index never matches a column: its s_y
//             stays NaN, and logp and H are NaN (when `validate` did not raise first).
//   backward: per tile, recompute the logits; E turns them into
//             dlogits = [g_l (onehot(y) - p) - g_H p (log p + H)] / T  (0 on ignored rows and
//             rows whose label is outside [0, V))
//             in the operands' dtype; then d_hidden[rows] += dlogits @ W_tile (float32),
//             d_weight[tile] (+)= dlogits^T @ hidden[rows], d_bias[tile] += column sums.
// Batch invariance (a row's logp, entropy and d_hidden row are bitwise the same whatever other
// rows share its batch, how many, in which order): the tiles do not depend on N. vc and nt
// come from (V, H, the tile budget, E::kMaxRows) alone (linear_tiles); every matmul has the shape
// [nt, H] x [H, n] (n = vc, or the fixed width of the last vocabulary tile) or [nt, n] x [n, H],
// whatever N is: the last token block is padded to nt rows (its rows copied into a zeroed [nt, H]
// block, whose extra rows are multiplied and never written out), and so is a block whose rows do
// not start on a kBlockAlign-byte boundary (a sub-batch that is a view into a larger batch).
// MKL and cuBLAS then run the same algorithm with the same reduction order on every block, and a
// row's result does not depend on its position in the block (checked on the CPU for MKL, at
// 1-64 threads, for blocks of 64 rows or more; below about 12 rows MKL's multithreaded small-matrix
// path is not, which only the tests' tiny `tile` budgets reach); each row's online softmax
// merges the same vocabulary tiles in the same order. The cost: the padding, up to nt - 1 rows'
// matmul work per call (nt = 256 on the CPU, 2048 on a GPU): large only for small N. (The d_weight
// tile accumulator's [vc, H] also bounds vc: at H > nt, tiles are narrower than the budget allows.)
// d_hidden is made per block into a float32 [nt, H] scratch and added to the rows'
// accumulator (the same product for every block); d_weight and d_bias, which sum over rows, use
// the block's real rows only.
// Extra memory: the float32 tile (nt * vc: at most `tile` elements, by default
// E::kDefaultTileBytes), its dlogits copy in the operands' dtype when that is not float32, the
// padded row block [nt, H] and the d_hidden product [nt, H], the running statistics [N, 4], the
// float32 d_hidden [N, H] and d_bias [V] accumulators, a float32 d_weight tile accumulator
// [vc, H] only for 16-bit d_weight when there are several token blocks (float32 d_weight
// accumulates in place), and E::operand's copies (CPU, 16-bit inputs only: hidden and one weight
// tile in float32).
//
// E provides:
//   static constexpr int64_t kDefaultTileBytes;
//   static constexpr int64_t kMaxRows;          token rows per block (a power of two)
//   static at::Tensor operand(t);               matmul operand: t itself, or a float32 copy
//   static at::Tensor log(d);                   log of the row sums d [N] (a float32 strided view)
//   static void mm_f32(out, a, b);              out (float32) = a @ b
//   static void addmm_f32(acc, a, b);           acc (float32) += a @ b
//   static void check_label_range(labels, V, ignore_index, op);   the `validate` check
//                                               (rlhf/label_dispatch.h; CUDA: skipped while capturing)
//   static void fold(logits [nr, n] f32, bias + c0 or nullptr, labels [nr], c0, inv_t, running [nr, 4]);
//   static void grad(logits [nr, n] f32, dlogits out [nr, n] (may alias logits), bias + c0 or
//                    nullptr, labels [nr], c0, V, inv_t, ignore_index, stats [nr, 2], entropy [nr],
//                    g_logp [nr] or undefined, g_entropy [nr] or undefined);
// Every tensor E gets is contiguous, and so are the matmul operands (hidden and weight are
// made contiguous first: a copy only when they are not). E::fold treats a label in
// [c0, c0 + n) as its own; the running s_y of an ignored row is never read.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "rlhf/checks.h"
#include "rlhf/label_dispatch.h"

namespace rlhf {

struct LinearTiles {
  int64_t vc, nt;  // vocabulary columns and token rows per tile
};

// Tiles that do not depend on the number of tokens (batch invariance, see the top): nt token rows,
// the largest power of two <= max_rows that leaves 128 columns in the budget; vc columns, as many
// as the budget allows for nt rows and for the d_weight tile accumulator [vc, H], a multiple of
// 128 (aligned rows), at most V.
inline LinearTiles linear_tiles(int64_t V, int64_t H, int64_t budget, int64_t max_rows) {
  constexpr int64_t kAlign = 128;
  budget = std::max<int64_t>(budget, kAlign);
  int64_t nt = 1;
  while (nt * 2 <= std::min(max_rows, budget / kAlign)) nt *= 2;
  int64_t vc = budget / std::max(nt, H) / kAlign * kAlign;
  if (vc == 0) vc = kAlign;
  vc = std::min(vc, V);
  return {vc, nt};
}

inline int64_t linear_tile_budget(int64_t tile, int64_t default_bytes) {
  return tile > 0 ? tile : default_bytes / static_cast<int64_t>(sizeof(float));
}

// A row block's start: used in place only when aligned to this many bytes (else copied).
constexpr int64_t kBlockAlign = 64;

// The matmul operand of token rows [r0, r0 + nr) of h [N, H] as a [nt, H] block: h's own rows
// when they are a whole block starting on a kBlockAlign-byte boundary, else a copy into the first
// nr rows of `pad` ([nt, H], zeroed when made on first use; its other rows are multiplied, never
// written out, and a product row depends on its own row alone).
inline at::Tensor linear_row_block(const at::Tensor& h, at::Tensor& pad, int64_t r0, int64_t nr, int64_t nt) {
  const at::Tensor rows = h.narrow(0, r0, nr);
  if (nr == nt && reinterpret_cast<std::uintptr_t>(rows.data_ptr()) % kBlockAlign == 0) return rows;
  if (!pad.defined()) pad = at::zeros({nt, h.size(1)}, h.options());
  pad.narrow(0, 0, nr).copy_(rows);
  return pad;
}

// The float32 logits (without bias) of the [nt, H] row block and columns [c0, c0 + n), into the
// first nt * n elements of `buf` (so the tile is contiguous whatever its width) -> [nt, n].
template <typename E>
at::Tensor linear_tile_logits(const at::Tensor& buf, const at::Tensor& block, const at::Tensor& w_tile) {
  at::Tensor out = buf.narrow(0, 0, block.size(0) * w_tile.size(0)).view({block.size(0), w_tile.size(0)});
  E::mm_f32(out, block, w_tile.t());
  return out;
}

inline const float* linear_bias_ptr(const at::Tensor& bias_f32, int64_t c0) {
  return bias_f32.defined() ? bias_f32.data_ptr<float>() + c0 : nullptr;
}

// -> (logp [...], entropy [...], stats [N, 2] = (m, log d)), float32.
template <typename E>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_forward(const at::Tensor& hidden,
                                                                       const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& bias,
                                                                       const at::Tensor& labels, double temperature,
                                                                       int64_t ignore_index, int64_t tile,
                                                                       bool validate) {
  const char* op = "linear_token_logprobs";
  const auto hv = check_linear(hidden, weight, bias, op);
  const int64_t H = hv.first, V = hv.second;
  const at::Tensor y = check_labels(labels, hidden, "hidden", "H", op).reshape({-1});
  const float inv_t = inverse_temperature(temperature, op);
  const int64_t N = y.numel();
  const at::IntArrayRef lead = lead_shape(hidden);
  const auto f32 = hidden.options().dtype(at::kFloat);
  if (N == 0) return {at::empty(lead, f32), at::empty(lead, f32), at::empty({0, 2}, f32)};
  if (validate) E::check_label_range(y, V, ignore_index, op);
  const LinearTiles tl = linear_tiles(V, H, linear_tile_budget(tile, E::kDefaultTileBytes), E::kMaxRows);
  const at::Tensor h = E::operand(hidden.reshape({N, H}).contiguous());
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor b = bias.has_value() ? as_f32(*bias) : at::Tensor();
  at::Tensor pad;  // the padded row block, made on first use
  // running (m, d, w, s_y): m starts at -inf, d and w at 0, s_y at NaN (a label outside the
  // vocabulary never sets it)
  at::Tensor running = at::zeros({N, 4}, f32);
  running.select(1, 0).fill_(-INFINITY);
  running.select(1, 3).fill_(NAN);
  at::Tensor buf = at::empty({tl.nt * tl.vc}, f32);
  for (int64_t c0 = 0; c0 < V; c0 += tl.vc) {
    const int64_t n = std::min(tl.vc, V - c0);
    const at::Tensor w = E::operand(weight_c.narrow(0, c0, n));
    for (int64_t r0 = 0; r0 < N; r0 += tl.nt) {
      const int64_t nr = std::min(tl.nt, N - r0);
      const at::Tensor logits = linear_tile_logits<E>(buf, linear_row_block(h, pad, r0, nr, tl.nt), w).narrow(0, 0, nr);
      E::fold(logits, linear_bias_ptr(b, c0), y.narrow(0, r0, nr), c0, inv_t, running.narrow(0, r0, nr));
    }
  }
  // log d through the epilogue (E::log): the CPU takes the scalar log the policy head's epilogue
  // takes, so linear_policy_loss's logprobs stat equals linear_token_logprobs' bitwise
  const at::Tensor m = running.select(1, 0), log_d = E::log(running.select(1, 1));
  const at::Tensor ignored = y.eq(ignore_index);
  const at::Tensor in_vocab = y.ge(0).logical_and_(y.lt(V));
  const at::Tensor logp = at::where(ignored, 0.0, running.select(1, 3).sub(m).sub(log_d));
  const at::Tensor h_row = log_d.sub(running.select(1, 2).div(running.select(1, 1)));
  const at::Tensor entropy = at::where(ignored, 0.0, at::where(in_vocab, h_row, NAN));
  return {logp.reshape(lead), entropy.reshape(lead), at::stack({m, log_d}, 1)};
}

// -> (d_hidden [..., H] or [0], d_weight [V, H] or [0], d_bias [V] or [0]) in the input dtype.
template <typename E>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, const c10::optional<at::Tensor>& grad_logp,
    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, int64_t tile, bool need_hidden, bool need_weight, bool need_bias) {
  const char* op = "linear_token_logprobs backward";
  const auto hv = check_linear(hidden, weight, bias, op);
  const int64_t H = hv.first, V = hv.second;
  const at::Tensor y = check_labels(labels, hidden, "hidden", "H", op).reshape({-1});
  const int64_t N = y.numel();
  at::Tensor gl = opt_per_position(grad_logp, hidden, "grad_logp", "hidden", op);
  at::Tensor gh = opt_per_position(grad_entropy, hidden, "grad_entropy", "hidden", op);
  const at::Tensor ent = check_per_position(entropy, hidden, "entropy", "hidden", op).reshape({-1});
  if (gl.defined()) gl = gl.reshape({-1});
  if (gh.defined()) gh = gh.reshape({-1});
  check_rows_f32(stats, N, 2, "stats", hidden, "hidden", op);
  const float inv_t = inverse_temperature(temperature, op);
  TORCH_CHECK_VALUE(!need_bias || bias.has_value(), op, ": a bias gradient was asked for without a `bias`");
  const auto dt = hidden.scalar_type();
  const auto f32 = hidden.options().dtype(at::kFloat);
  // an output that was not asked for is a fresh [0] tensor (outputs must not alias)
  const auto none_like = [&] { return at::empty({0}, hidden.options()); };
  const at::Tensor none = none_like();
  // d_hidden and d_bias accumulate in float32 across vocabulary tiles
  at::Tensor d_hidden = need_hidden ? at::zeros({N, H}, f32) : none;
  at::Tensor d_weight = need_weight ? at::empty({V, H}, hidden.options()) : none;
  at::Tensor d_bias = need_bias ? at::zeros({V}, f32) : none;
  const auto outputs = [&] {
    return std::make_tuple(need_hidden ? d_hidden.to(dt).reshape(hidden.sizes()) : none_like(),
                           need_weight ? d_weight : none_like(), need_bias ? d_bias.to(dt) : none_like());
  };
  if (N == 0 || !(need_hidden || need_weight || need_bias)) {
    if (need_weight) d_weight.zero_();
    return outputs();
  }
  const LinearTiles tl = linear_tiles(V, H, linear_tile_budget(tile, E::kDefaultTileBytes), E::kMaxRows);
  const bool token_tiled = tl.nt < N;
  const at::Tensor h = E::operand(hidden.reshape({N, H}).contiguous());
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor b = bias.has_value() ? as_f32(*bias) : at::Tensor();
  at::Tensor pad;  // the padded row block, made on first use
  at::Tensor buf = at::empty({tl.nt * tl.vc}, f32);
  // dlogits in the matmul operands' dtype: in place over the float32 tile when that is float32
  const bool in_place = h.scalar_type() == at::kFloat;
  at::Tensor gbuf = in_place ? buf : at::empty({tl.nt * tl.vc}, h.options());
  // a block's d_hidden product [nt, H], added to its rows' float32 accumulator
  at::Tensor dh_block = need_hidden ? at::empty({tl.nt, H}, f32) : none;
  // d_weight over several token blocks: in place when float32, else in a float32 tile accumulator
  const bool dw_acc_used = need_weight && token_tiled && dt != at::kFloat;
  at::Tensor dw_acc = dw_acc_used ? at::empty({tl.vc, H}, f32) : none;
  const auto rows = [](const at::Tensor& t, int64_t r0, int64_t nr) {
    return t.defined() ? t.narrow(0, r0, nr) : at::Tensor();
  };
  for (int64_t c0 = 0; c0 < V; c0 += tl.vc) {
    const int64_t n = std::min(tl.vc, V - c0);
    const at::Tensor w = E::operand(weight_c.narrow(0, c0, n));
    at::Tensor dw = need_weight ? d_weight.narrow(0, c0, n) : none;
    at::Tensor dw_f32 = !(need_weight && token_tiled) ? none : dw_acc_used ? dw_acc.narrow(0, 0, n) : dw;
    for (int64_t r0 = 0; r0 < N; r0 += tl.nt) {
      const int64_t nr = std::min(tl.nt, N - r0);
      const at::Tensor logits_block = linear_tile_logits<E>(buf, linear_row_block(h, pad, r0, nr, tl.nt), w);
      const at::Tensor logits = logits_block.narrow(0, 0, nr);
      // the block's dlogits [nt, n]: the epilogue writes the first nr rows; the others are the
      // padding's (never read into a real row: each product row depends on its own row alone)
      at::Tensor dz_block = in_place ? logits_block : gbuf.narrow(0, 0, tl.nt * n).view({tl.nt, n});
      at::Tensor dz = dz_block.narrow(0, 0, nr);
      E::grad(logits, dz, linear_bias_ptr(b, c0), y.narrow(0, r0, nr), c0, V, inv_t, ignore_index,
              stats.narrow(0, r0, nr), ent.narrow(0, r0, nr), rows(gl, r0, nr), rows(gh, r0, nr));
      const at::Tensor hr = h.narrow(0, r0, nr);
      if (need_hidden) {
        E::mm_f32(dh_block, dz_block, w);
        d_hidden.narrow(0, r0, nr).add_(dh_block.narrow(0, 0, nr));
      }
      if (need_weight) {
        if (!token_tiled) {  // the only token block: one product, rounded once
          if (dz.scalar_type() == dt) {
            at::mm_out(dw, dz.t(), hr);
          } else {
            dw.copy_(at::mm(dz.t(), hr));
          }
        } else if (r0 == 0) {
          E::mm_f32(dw_f32, dz.t(), hr);
        } else {
          E::addmm_f32(dw_f32, dz.t(), hr);
        }
      }
      if (need_bias) d_bias.narrow(0, c0, n).add_(at::sum(dz, {0}, false, at::kFloat));
    }
    if (dw_acc_used) dw.copy_(dw_f32);
  }
  return outputs();
}

}  // namespace rlhf
