// The one native module, rlhf_kernels._C: operator schemas for the dispatcher
// (the CPU and CUDA implementations register themselves in cpu/ and cuda/),
// plus build facts for `python -m rlhf_kernels.info`.
#include <torch/extension.h>
#include <torch/library.h>

#if RLHF_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(rlhf_kernels, m) {
  // gae family: float32 [B, T] (or [N] packed) inputs, bool masks, int64 cu_seqlens.
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, Tensor? last_values, float gamma, float lam)"
        " -> (Tensor, Tensor)");
  m.def("gae_packed(Tensor rewards, Tensor values, Tensor cu_seqlens, Tensor? last_values, Tensor? mask,"
        " float gamma, float lam) -> (Tensor, Tensor)");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");
  // logprobs family: logits [N, V] float32/float16/bfloat16 contiguous, labels [N] int64/int32;
  // per-row outputs float32 [N]; saved softmax statistics float32 [N, 2] = (max, log sum exp(s - max))
  // ([N, 4] with the reference's for full_kl); gradients in the logits' dtype.
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index)"
        " -> (Tensor logp, Tensor entropy, Tensor stats)");
  m.def("token_entropy_fwd(Tensor logits, float temperature) -> (Tensor entropy, Tensor stats)");
  m.def("logprobs_bwd(Tensor logits, Tensor? labels, Tensor? grad_logp, Tensor? grad_entropy, Tensor stats,"
        " Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def("logprobs_bwd_inplace(Tensor(a!) logits, Tensor? labels, Tensor? grad_logp, Tensor? grad_entropy,"
        " Tensor stats, Tensor entropy, float temperature, int ignore_index) -> ()");
  m.def("full_kl_fwd(Tensor logits, Tensor ref_logits, float temperature) -> (Tensor kl, Tensor stats)");
  m.def("full_kl_bwd(Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor kl, Tensor stats,"
        " float temperature) -> Tensor");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["torch"] = TORCH_VERSION;
  d["cuda"] = static_cast<bool>(RLHF_WITH_CUDA);
#if RLHF_WITH_CUDA
  d["cuda_runtime"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  d["cuda_runtime"] = pybind11::none();
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf-kernels native kernels (CPU and, when built, CUDA); ops live in torch.ops.rlhf_kernels";
  m.def("build_info", &build_info, "Facts compiled into this binary: torch version, CUDA or not");
}
