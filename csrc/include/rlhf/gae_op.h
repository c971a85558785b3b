// The gae ops' host side, written once for both devices: argument checks, conversion of the
// inputs to what the kernels read (float32 and bool, contiguous: no copy when they already
// are), allocation of the outputs, then one call into the device's launchers `Dev`
// (csrc/cpu/gae.cpp, csrc/cuda/gae.cu), which see only the raw-pointer structs below.
//
// Dev provides:
//   static void gae(const GaeArgs&, const at::Tensor& like);
//   static void masked_whiten(const WhitenArgs&, const at::Tensor& like);
// `like` is a float32 input: the launcher takes its device (and stream) and allocates any
// scratch beside it. Nothing is read back to the host on a GPU.
//
// gae_packed's cu_seqlens are checked here only for what can be checked without reading
// them (shape, dtype, device); reading them costs a host sync on a GPU, so the Python API
// does it (and `validate=False` skips it). The kernels never read outside [0, N) whatever
// cu_seqlens holds: a row's bounds are clamped to [0, N].
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "rlhf/checks.h"

namespace rlhf {

struct GaeArgs {
  const float *rewards, *values;  // [N]: padded rows laid end to end ([B, T]) or packed sequences
  const bool* mask;               // [N], or nullptr (every step counts)
  const int64_t* cu_seqlens;      // [B+1] row offsets, or nullptr: row b is [b*T, (b+1)*T)
  const float* last_values;       // [B], or nullptr (0)
  int64_t B, T, N;                // T: padded row length (0 when packed)
  double gamma, lam;
  float *adv, *ret;               // [N] outputs
};

struct WhitenArgs {
  const float* x;    // [n]
  const bool* mask;  // [n]
  int64_t n;
  bool shift_mean, unbiased;
  double eps;
  float* out;  // [n]
};

template <typename Dev>
std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, const c10::optional<at::Tensor>& last_values,
                                               double gamma, double lam) {
  const char* op = "gae";
  check_floating(rewards, "rewards", op);
  check_floating(values, "values", op);
  check_dim(rewards, 2, "[B, T]", "rewards", op);
  check_like(values, "values", rewards, "rewards", op);
  check_like(mask, "mask", rewards, "rewards", op);
  check_discount(gamma, lam, op);
  const at::Tensor r = as_f32(rewards), v = as_f32(values), m = as_mask(mask, "mask", op);
  const int64_t B = r.size(0), T = r.size(1);
  const at::Tensor lv = check_last_values(last_values, B, r, op);
  at::Tensor adv = at::empty_like(r), ret = at::empty_like(r);
  if (r.numel() > 0)
    Dev::gae({r.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<bool>(), nullptr, ptr_or_null(lv), B, T,
              r.numel(), gamma, lam, adv.data_ptr<float>(), ret.data_ptr<float>()},
             r);
  return {adv, ret};
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor> gae_packed_forward(const at::Tensor& rewards, const at::Tensor& values,
                                                      const at::Tensor& cu_seqlens,
                                                      const c10::optional<at::Tensor>& last_values,
                                                      const c10::optional<at::Tensor>& mask, double gamma,
                                                      double lam) {
  const char* op = "gae_packed";
  check_floating(rewards, "rewards", op);
  check_floating(values, "values", op);
  check_dim(rewards, 1, "[N]", "rewards", op);
  check_like(values, "values", rewards, "rewards", op);
  check_integer(cu_seqlens, "cu_seqlens", op);
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
                    ": `cu_seqlens` must be [B+1] with B >= 0, got shape ", cu_seqlens.sizes());
  check_same_device(cu_seqlens, "cu_seqlens", rewards, "rewards", op);
  check_discount(gamma, lam, op);
  at::Tensor m;
  if (mask.has_value()) {
    check_like(*mask, "mask", rewards, "rewards", op);
    m = as_mask(*mask, "mask", op);
  }
  const at::Tensor r = as_f32(rewards), v = as_f32(values), cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t B = cu.size(0) - 1;
  const at::Tensor lv = check_last_values(last_values, B, r, op);
  at::Tensor adv = at::empty_like(r), ret = at::empty_like(r);
  if (r.numel() > 0)  // B may be 0 here (then cu_seqlens are wrong): the launcher copes
    Dev::gae({r.data_ptr<float>(), v.data_ptr<float>(), m.defined() ? m.data_ptr<bool>() : nullptr,
              cu.data_ptr<int64_t>(), ptr_or_null(lv), B, 0, r.numel(), gamma, lam, adv.data_ptr<float>(),
              ret.data_ptr<float>()},
             r);
  return {adv, ret};
}

template <typename Dev>
at::Tensor masked_whiten_forward(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased,
                                 double eps) {
  const char* op = "masked_whiten";
  check_floating(x, "x", op);
  check_like(mask, "mask", x, "x", op);
  TORCH_CHECK_VALUE(eps >= 0, op, ": `eps` must be >= 0, got ", eps);
  const at::Tensor xf = as_f32(x), m = as_mask(mask, "mask", op);
  at::Tensor out = at::empty_like(xf);
  if (xf.numel() > 0)
    Dev::masked_whiten({xf.data_ptr<float>(), m.data_ptr<bool>(), xf.numel(), shift_mean, unbiased, eps,
                        out.data_ptr<float>()},
                       xf);
  return out;
}

}  // namespace rlhf
