// Per-step GAE math, used by both csrc/cpu/gae.cpp and csrc/cuda/gae.cu.
//
// For one sequence, scanning t from the end:
//   V_next(t) = value of the next unmasked step after t, or last_value
//   delta_t   = r_t + gamma * V_next(t) - V_t                  (unmasked t)
//   A_t       = delta_t + gamma * lam * A_{next unmasked step}  (0 after the last)
// A masked step is skipped: no TD error, and it does not break the chain
// (it is the identity map). Advantages and returns are 0 there.
#pragma once
#include "rlhf/common.h"

namespace rlhf {

// The map that step t applies to "A of the next unmasked step".
template <typename T>
RLHF_HD Affine<T> gae_step_map(bool valid, T reward, T value, T next_value, T gamma, T lam) {
  if (!valid) return {T(1), T(0)};
  return {gamma * lam, reward + gamma * next_value - value};
}

// The map that step t+1 applies to "value of the next unmasked step after t+1",
// giving the value of the next unmasked step after t.
template <typename T>
RLHF_HD Affine<T> next_value_map(bool valid_next, T value_next) {
  if (!valid_next) return {T(1), T(0)};
  return {T(0), value_next};
}

}  // namespace rlhf
