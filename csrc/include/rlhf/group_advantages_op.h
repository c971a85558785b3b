// The group_advantages ops' host side, written once for both devices: argument checks,
// conversion of the inputs to what the kernels read (float32 rewards, int64 group ids, bool
// mask, contiguous: no copy when they already are), allocation of the outputs, then one call
// into the device's launcher `Dev` (csrc/cpu/group_advantages.cpp, csrc/cuda/group_advantages.cu),
// which sees only the raw-pointer struct below.
//
// Dev provides:
//   static void group_advantages(const GroupAdvArgs&, const at::Tensor& like, const at::Tensor& group_index);
// `like` is the float32 rewards: the launcher takes its device (and stream) and allocates any
// scratch beside it; `group_index` is the int64 ids of args.group_index (undefined with
// group_size), for launchers that sort them with ATen. Nothing is read back to the host on a
// GPU: group ids are read by the kernels only.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string_view>
#include <tuple>

#include "rlhf/checks.h"
#include "rlhf/group_advantages.h"

namespace rlhf {

struct GroupAdvArgs {
  const float* rewards;        // [B]
  const int64_t* group_index;  // [B] group ids, or nullptr: groups of group_size consecutive sequences
  int64_t B, group_size;       // group_size: 0 with group_index, else >= 1 and dividing B
  int mode;                    // AdvMode
  double eps;
  const bool* mask;            // [B, T], or nullptr
  int64_t T;                   // mask's second dimension (0 without a mask)
  float* adv;                  // [B] out
  float* token_adv;            // [B, T] out: adv where mask, else 0 (nullptr without a mask)
};

// The public default of `eps`; a mode that does not use eps refuses any other value. Python's
// copy is DEFAULT_GROUP_EPS in rlhf_kernels/_layout.py (tests/test_layout.py checks they agree).
constexpr double kDefaultGroupEps = 1e-6;

inline int parse_adv_mode(std::string_view mode, const char* op) {
  if (mode == "grpo") return kGrpo;
  if (mode == "dr_grpo") return kDrGrpo;
  if (mode == "rloo") return kRloo;
  if (mode == "reinforce++") return kReinforcePP;
  TORCH_CHECK_VALUE(false, op, ": unknown `mode` '", mode, "'; choose one of 'grpo', 'dr_grpo', 'rloo', 'reinforce++'");
  return -1;
}

namespace detail {

struct GroupAdvInputs {
  at::Tensor rewards, group_index;  // float32 [B]; int64 [B] or undefined
  GroupAdvArgs args;                // everything but mask, T and the outputs
};

inline GroupAdvInputs group_adv_call(const at::Tensor& rewards, const c10::optional<at::Tensor>& group_index,
                                     c10::optional<int64_t> group_size, std::string_view mode, double eps,
                                     const char* op) {
  check_floating(rewards, "rewards", op);
  check_dim(rewards, 1, "[B]", "rewards", op);
  const int64_t B = rewards.size(0);
  TORCH_CHECK_VALUE(group_index.has_value() != group_size.has_value(), op,
                    ": give exactly one of `group_index` (a group id per sequence) and `group_size` (groups of "
                    "consecutive sequences), got ", group_index.has_value() ? "both" : "neither");
  at::Tensor ids;
  if (group_size.has_value()) {
    TORCH_CHECK_VALUE(*group_size >= 1, op, ": `group_size` must be >= 1, got ", *group_size);
    TORCH_CHECK_VALUE(B % *group_size == 0, op, ": `group_size` = ", *group_size,
                      " must divide the number of sequences B = ", B, " (rewards shape ", rewards.sizes(), ")");
  } else {
    check_integer(*group_index, "group_index", op);
    TORCH_CHECK_VALUE(group_index->dim() == 1 && group_index->size(0) == B, op,
                      ": `group_index` must have shape [B] = [", B, "] (one group id per reward), got ",
                      group_index->sizes());
    check_same_device(*group_index, "group_index", rewards, "rewards", op);
    ids = group_index->scalar_type() == at::kLong && group_index->is_contiguous()
              ? *group_index
              : group_index->to(at::kLong).contiguous();
  }
  const int m = parse_adv_mode(mode, op);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": `eps` must be a finite number >= 0, got ", eps);
  TORCH_CHECK_VALUE(eps == kDefaultGroupEps || m == kGrpo || m == kReinforcePP, op, ": `eps` = ", eps,
                    " is not used by mode '", mode, "' (only 'grpo' and 'reinforce++' divide by a std); leave it at ",
                    kDefaultGroupEps);
  GroupAdvInputs in{as_f32(rewards), ids, {}};
  in.args = {in.rewards.data_ptr<float>(), ids.defined() ? ids.data_ptr<int64_t>() : nullptr, B,
             group_size.value_or(0), m, eps, nullptr, 0, nullptr, nullptr};
  return in;
}

}  // namespace detail

template <typename Dev>
at::Tensor group_advantages_forward(const at::Tensor& rewards, const c10::optional<at::Tensor>& group_index,
                                    c10::optional<int64_t> group_size, std::string_view mode, double eps) {
  detail::GroupAdvInputs in = detail::group_adv_call(rewards, group_index, group_size, mode, eps, "group_advantages");
  at::Tensor adv = at::empty({in.args.B}, in.rewards.options());
  in.args.adv = adv.data_ptr<float>();
  if (in.args.B > 0) Dev::group_advantages(in.args, in.rewards, in.group_index);
  return adv;
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor> group_advantages_masked_forward(const at::Tensor& rewards,
                                                                   const c10::optional<at::Tensor>& group_index,
                                                                   c10::optional<int64_t> group_size,
                                                                   std::string_view mode, double eps,
                                                                   const at::Tensor& mask) {
  const char* op = "group_advantages";
  detail::GroupAdvInputs in = detail::group_adv_call(rewards, group_index, group_size, mode, eps, op);
  const int64_t B = in.args.B;
  const at::Tensor m = as_mask(mask, "mask", op);
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B, op, ": `mask` must have shape [B, T] with B = ", B,
                    " (the number of rewards), got ", mask.sizes());
  check_same_device(mask, "mask", rewards, "rewards", op);
  const int64_t T = m.size(1);
  at::Tensor adv = at::empty({B}, in.rewards.options()), token_adv = at::empty({B, T}, in.rewards.options());
  in.args.mask = m.data_ptr<bool>();
  in.args.T = T;
  in.args.adv = adv.data_ptr<float>();
  in.args.token_adv = token_adv.data_ptr<float>();
  if (B > 0) Dev::group_advantages(in.args, in.rewards, in.group_index);
  return {adv, token_adv};
}

}  // namespace rlhf
