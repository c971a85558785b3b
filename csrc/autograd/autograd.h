// Shared pieces of the C++ autograd wiring (csrc/autograd/<family>.cpp).
//
// Each differentiable native op `<name>_fwd` gets an Autograd kernel: a
// torch::autograd::Function whose forward calls the op itself below autograd (so the
// dispatcher still picks the CPU or CUDA kernel, and torch.compile still records the op),
// saves what the backward needs, and whose backward calls `<name>_bwd` through the
// dispatcher. Forward and backward never re-enter Python.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <utility>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace rlhf::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of rlhf_kernels::<name> (looked up once per call site).
template <typename Sig>
c10::TypedOperatorHandle<Sig> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// `n` undefined gradients: for the forward's arguments that get none.
inline variable_list no_grads(size_t n) { return variable_list(n); }

// Whether a forward must record a backward node: grad mode is on and one of the
// differentiable inputs requires a gradient. When it need not, the Autograd kernel calls
// the op straight below autograd and skips the node (its allocation and saved tensors),
// as PyTorch's own ops do.
inline bool records_grad(std::initializer_list<at::Tensor> differentiable) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& t : differentiable)
    if (t.requires_grad()) return true;
  return false;
}

namespace detail {
template <typename Tuple, size_t... I>
Tuple as_tuple(const variable_list& v, std::index_sequence<I...>) {
  return Tuple{v[I]...};
}
}  // namespace detail

// The Autograd kernel of a forward op, given its Function F (whose static run() calls the op
// below autograd): F::run when `record` is false (see records_grad), F::apply otherwise, with
// the outputs as the op's tuple either way.
template <typename F, typename... Args>
auto autograd_forward(bool record, const Args&... args) -> decltype(F::run(args...)) {
  using Out = decltype(F::run(args...));
  if (!record) return F::run(args...);
  return detail::as_tuple<Out>(F::apply(args...), std::make_index_sequence<std::tuple_size_v<Out>>{});
}

}  // namespace rlhf::autograd
