// Autograd keyed by the op schemas (as PyTorch's derivatives.yaml keys formulas by schema):
// the ops in kDerivatives below share one boxed Autograd kernel, which reads every argument
// from the registered schemas of the forward op and of its backward op. An argument added to
// both `m.def`s in csrc/bindings.cpp flows from the forward to the backward with no edit here.
//
// The backward op's arguments are matched by name, once, at the forward's first call:
//   grad           the upstream gradient of the forward's one differentiable output
//                  (grad_<output>: that output's, for a forward with several);
//   need_<input>   whether this backward must compute the gradient of that differentiable input;
//   <name>         the forward's input, or else its output (name the returns in the schema), of
//                  that name: saved by the forward (tensors as saved variables, with the same
//                  version check as save_for_backward), given back to the backward as it came;
//   anything else  the backward's default in its schema (so the plain ppo_policy_fwd and
//                  ppo_policy_options_fwd share ppo_policy_bwd), or an error naming both ops.
// The backward op returns one gradient per differentiable input, in the table's order; those
// not needed are dropped (and none computed when no input needs one).
//
// Forward: without a gradient to record (records_grad in autograd.h), the kernel redispatches
// the op below autograd and adds nothing (no node, nothing saved). Otherwise it saves what the
// backward reads, runs the op below autograd and attaches a SchemaBackward node to the
// differentiable outputs; the other outputs are non-differentiable. Backward: an undefined
// upstream gradient (the output was not used) gives undefined gradients; otherwise the
// backward op is called through the dispatcher with the stack the plan builds.
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

// One differentiable forward op. tests/test_autograd_schemas.py reads this table from this
// file: keep one entry per line, in this form.
struct Derivative {
  const char* forward;                     // rlhf_kernels::<forward>, whose Autograd kernel this is
  const char* backward;                    // the op that makes the gradients
  std::vector<const char*> inputs;         // the differentiable inputs, in the backward's return order
  std::vector<const char*> outputs;        // the differentiable outputs (the others are not)
};

const Derivative kDerivatives[] = {
    {"ppo_policy_fwd", "ppo_policy_bwd", {"logprobs"}, {"loss"}},
    {"ppo_policy_options_fwd", "ppo_policy_bwd", {"logprobs"}, {"loss"}},
    {"ppo_value_fwd", "ppo_value_bwd", {"values"}, {"loss"}},
    {"bt_fwd", "bt_bwd", {"chosen", "rejected"}, {"loss"}},
    {"ranking_fwd", "ranking_bwd", {"rewards"}, {"loss"}},
    {"linear_logprobs_fwd", "linear_logprobs_bwd", {"hidden", "weight", "bias"}, {"logp", "entropy"}},
};

// Where one argument of the backward op comes from.
struct Source {
  enum Kind : uint8_t { kGrad, kNeed, kTensor, kValue, kDefault } kind;
  uint32_t index;  // kGrad: differentiable output; kNeed: differentiable input; kTensor: saved tensor;
                   // kValue: saved value; kDefault: default
};

// A saved tensor: forward input or output `index`.
struct TensorSlot {
  bool output;
  bool is_output;  // a differentiable output (saved after the node is attached, as its own output)
  uint32_t index;
};

// The index plan of one forward op, built from the two schemas at its first call.
struct Plan {
  std::string name;                       // the node's name
  c10::OperatorHandle backward;           // the backward op
  size_t num_args = 0, num_returns = 0;   // the forward's
  std::vector<uint32_t> diff_inputs;      // forward argument index of each differentiable input
  std::vector<bool> diff_output;          // per forward return
  std::vector<TensorSlot> tensors;        // what the forward saves as saved variables
  std::vector<uint32_t> values;           // forward argument index of each saved non-tensor value
  std::vector<c10::IValue> defaults;      // the backward's defaults it takes
  std::vector<Source> args;               // per backward argument
  bool grad_required = false;             // some kGrad argument is a Tensor (not Tensor?)
};

bool is_tensor_type(const c10::TypePtr& t) { return t->isSubtypeOf(*c10::OptionalType::ofTensor()); }

int find(const std::vector<c10::Argument>& list, const std::string& name) {
  for (size_t i = 0; i < list.size(); ++i)
    if (list[i].name() == name) return static_cast<int>(i);
  return -1;
}

// The forward argument index of each named differentiable input, each checked to be a tensor argument.
std::vector<uint32_t> tensor_arguments(const c10::FunctionSchema& fwd, const std::vector<const char*>& names,
                                       const std::string& both, const char* forward) {
  std::vector<uint32_t> out;
  for (const char* name : names) {
    const int i = find(fwd.arguments(), name);
    TORCH_CHECK(i >= 0 && is_tensor_type(fwd.arguments()[i].type()), both, ": the differentiable input '", name,
                "' is not a tensor argument of ", forward, " (", fwd, ")");
    out.push_back(static_cast<uint32_t>(i));
  }
  return out;
}

Plan make_plan(const Derivative& d, const c10::FunctionSchema& fwd) {
  const c10::OperatorHandle bwd_op = c10::Dispatcher::singleton().findSchemaOrThrow(
      (std::string("rlhf_kernels::") + d.backward).c_str(), "");
  const c10::FunctionSchema& bwd = bwd_op.schema();
  const std::string both = "rlhf_kernels::" + std::string(d.forward) + " -> rlhf_kernels::" + d.backward;
  Plan p{std::string(d.forward) + "Backward", bwd_op};
  p.num_args = fwd.arguments().size();
  p.num_returns = fwd.returns().size();
  p.diff_inputs = tensor_arguments(fwd, d.inputs, both, d.forward);
  p.diff_output.assign(p.num_returns, false);
  std::vector<std::string> diff_names;
  for (const char* name : d.outputs) {
    const int j = find(fwd.returns(), name);
    TORCH_CHECK(j >= 0, both, ": the differentiable output '", name, "' is not a named return of ", d.forward,
                " (", fwd, ")");
    p.diff_output[j] = true;
  }
  for (size_t j = 0; j < p.num_returns; ++j)  // in the order of the node's inputs (the upstream gradients)
    if (p.diff_output[j]) diff_names.push_back(fwd.returns()[j].name());
  TORCH_CHECK(bwd.returns().size() == d.inputs.size(), both, ": ", d.backward, " returns ", bwd.returns().size(),
              " tensors, expected one per differentiable input (", d.inputs.size(), ")");
  for (const c10::Argument& a : bwd.arguments()) {
    const std::string& name = a.name();
    const int i = find(fwd.arguments(), name);
    const int j = find(fwd.returns(), name);
    TORCH_CHECK(i < 0 || j < 0, both, ": '", name, "' names both an input and an output of ", d.forward);
    if (name == "grad" || name.rfind("grad_", 0) == 0) {
      TORCH_CHECK(i < 0 && j < 0, both, ": '", name, "' is an upstream gradient and an argument of ", d.forward);
      int k = -1;
      if (name == "grad") {
        TORCH_CHECK(diff_names.size() == 1, both, ": 'grad' needs one differentiable output, ", d.forward,
                    " has ", diff_names.size(), "; name them grad_<output>");
        k = 0;
      } else {
        for (size_t n = 0; n < diff_names.size(); ++n)
          if (diff_names[n] == name.substr(5)) k = static_cast<int>(n);
        TORCH_CHECK(k >= 0, both, ": '", name, "' is not grad_<a differentiable output of ", d.forward, ">");
      }
      TORCH_CHECK(is_tensor_type(a.type()), both, ": '", name, "' is ", a.type()->str(), ", expected a Tensor");
      if (a.type()->kind() == c10::TypeKind::TensorType) p.grad_required = true;
      p.args.push_back({Source::kGrad, static_cast<uint32_t>(k)});
    } else if (name.rfind("need_", 0) == 0 && i < 0 && j < 0) {
      int k = -1;
      for (size_t n = 0; n < d.inputs.size(); ++n)
        if (d.inputs[n] == name.substr(5)) k = static_cast<int>(n);
      TORCH_CHECK(k >= 0 && a.type()->kind() == c10::TypeKind::BoolType, both, ": '", name,
                  "' is not bool need_<a differentiable input of ", d.forward, ">");
      p.args.push_back({Source::kNeed, static_cast<uint32_t>(k)});
    } else if (i >= 0 || j >= 0) {
      const c10::Argument& from = i >= 0 ? fwd.arguments()[i] : fwd.returns()[j];
      TORCH_CHECK(from.type()->isSubtypeOf(*a.type()), both, ": '", name, "' is ", from.type()->str(), " in ",
                  d.forward, " but ", a.type()->str(), " in ", d.backward);
      if (is_tensor_type(from.type())) {
        const bool output = j >= 0;
        p.args.push_back({Source::kTensor, static_cast<uint32_t>(p.tensors.size())});
        p.tensors.push_back({output, output && p.diff_output[j], static_cast<uint32_t>(output ? j : i)});
      } else {
        TORCH_CHECK(i >= 0, both, ": the output '", name, "' is not a tensor");
        p.args.push_back({Source::kValue, static_cast<uint32_t>(p.values.size())});
        p.values.push_back(static_cast<uint32_t>(i));
      }
    } else {
      TORCH_CHECK(a.default_value().has_value(), both, ": ", d.backward, "'s argument '", name,
                  "' is no input or output of ", d.forward, " and has no default (", d.forward, ": ", fwd, "; ",
                  d.backward, ": ", bwd, ")");
      p.args.push_back({Source::kDefault, static_cast<uint32_t>(p.defaults.size())});
      p.defaults.push_back(*a.default_value());
    }
  }
  return p;
}

// The op below autograd, on the boxed stack: what a forward that records nothing runs.
void call_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// The node's next edges: one per differentiable input (an empty edge for an absent optional), after
// functorch's check, as torch::autograd::Function makes it.
void connect(torch::autograd::Node& node, const c10::IValue* args, const std::vector<uint32_t>& diff_inputs) {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor())
    functorch_tls->checkSupportsCppAutogradFunction();  // as torch::autograd::Function does
  torch::autograd::edge_list edges;
  edges.reserve(diff_inputs.size());
  for (uint32_t i : diff_inputs)
    edges.push_back(args[i].isTensor() ? torch::autograd::impl::gradient_edge(args[i].toTensor())
                                       : torch::autograd::Edge());
  node.set_next_edges(std::move(edges));
}

// The backward node of one call: what the forward saved, and the plan to call the backward op.
struct SchemaBackward : public torch::autograd::TraceableFunction {
  explicit SchemaBackward(const Plan* plan) : plan_(plan), tensors_(plan->tensors.size()) {
    values_.reserve(plan->values.size());
  }

  std::string name() const override { return plan_->name; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& t : tensors_) t.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Plan& p = *plan_;
    variable_list out(p.diff_inputs.size());
    bool any = false;
    for (const auto& g : grads) any = any || g.defined();
    if (!any) return out;  // the outputs were not used: zero gradients
    any = false;
    for (size_t k = 0; k < out.size(); ++k) any = any || task_should_compute_output(k);
    if (!any) return out;
    torch::jit::Stack stack;
    stack.reserve(p.args.size());
    for (const Source& s : p.args) {
      switch (s.kind) {
        case Source::kGrad: {
          const at::Tensor& g = grads[s.index];
          if (!g.defined() && p.grad_required) return out;
          stack.emplace_back(g.defined() ? c10::IValue(g) : c10::IValue());
          break;
        }
        case Source::kNeed:
          stack.emplace_back(task_should_compute_output(s.index));
          break;
        case Source::kTensor: {
          at::Tensor t = p.tensors[s.index].is_output ? tensors_[s.index].unpack(getptr())
                                                     : tensors_[s.index].unpack();
          stack.emplace_back(t.defined() ? c10::IValue(std::move(t)) : c10::IValue());
          break;
        }
        case Source::kValue:
          stack.push_back(values_[s.index]);
          break;
        case Source::kDefault:
          stack.push_back(p.defaults[s.index]);
          break;
      }
    }
    p.backward.callBoxed(stack);
    for (size_t k = 0; k < out.size(); ++k)
      if (stack[k].isTensor() && task_should_compute_output(k)) out[k] = std::move(stack[k]).toTensor();
    return out;
  }

  const Plan* plan_;
  std::vector<torch::autograd::SavedVariable> tensors_;
  std::vector<c10::IValue> values_;
};

// A boxed Autograd kernel's plan, made from the op's schema at its first call (no lookup by name
// on any later call).
template <typename Table, typename PlanT, PlanT (*Make)(const Table&, const c10::FunctionSchema&)>
class Planned : public c10::OperatorKernel {
 protected:
  explicit Planned(const Table* d) : d_(d) {}
  const PlanT& plan(const c10::OperatorHandle& op) {
    std::call_once(once_, [&] { plan_ = std::make_unique<PlanT>(Make(*d_, op.schema())); });
    return *plan_;
  }

 private:
  const Table* d_;
  std::once_flag once_;
  std::unique_ptr<PlanT> plan_;
};

// The Autograd kernel of one op of kDerivatives.
class SchemaAutograd final : public Planned<Derivative, Plan, make_plan> {
 public:
  explicit SchemaAutograd(const Derivative* d) : Planned(d) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    const Plan& p = plan(op);
    const c10::IValue* args = stack->data() + (stack->size() - p.num_args);
    bool record = false;
    if (at::GradMode::is_enabled())
      for (uint32_t i : p.diff_inputs)
        record = record || (args[i].isTensor() && args[i].toTensor().requires_grad());
    if (!record) return call_below_autograd(op, ks, stack);
    auto node = c10::make_intrusive<SchemaBackward>(&p);
    connect(*node, args, p.diff_inputs);
    for (size_t k = 0; k < p.tensors.size(); ++k) {
      const TensorSlot& s = p.tensors[k];
      if (!s.output && args[s.index].isTensor())
        node->tensors_[k] = torch::autograd::SavedVariable(args[s.index].toTensor(), false);
    }
    for (uint32_t i : p.values) node->values_.push_back(args[i]);
    {
      at::AutoDispatchBelowADInplaceOrView below;
      op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
    }
    c10::IValue* outs = stack->data() + (stack->size() - p.num_returns);
    for (size_t j = 0; j < p.num_returns; ++j)
      if (p.diff_output[j]) torch::autograd::set_history(outs[j].toTensor(), node);
    for (size_t k = 0; k < p.tensors.size(); ++k) {
      const TensorSlot& s = p.tensors[k];
      if (s.output) node->tensors_[k] = torch::autograd::SavedVariable(outs[s.index].toTensor(), s.is_output);
    }
  }
};

// ---- ops whose forward makes the gradients ----
// While recording, the Autograd kernel of <forward> calls <with_grads> instead: in, the
// forward's arguments by name and need_<input> (whether that differentiable input requires a
// gradient); out, the forward's outputs by name and d_<input> (its gradient for a unit upstream
// gradient). The gradients are kept by the node alone (not as saved variables: nothing else
// holds them), so the backward multiplies them in place by the upstream gradient (a 0-d tensor
// on the device: no host sync) and hands them over without a copy. That multiply is the whole
// backward. They are handed over once: a second backward through the same call raises.
struct ForwardGradient {
  const char* forward;              // rlhf_kernels::<forward>, whose Autograd kernel this is
  const char* with_grads;           // the op that also makes the gradients
  std::vector<const char*> inputs;  // the differentiable inputs
  const char* output;               // the one differentiable output, a 0-d tensor
  const char* function;             // the public function, named by the error of a second backward
};

const ForwardGradient kForwardGradients[] = {
    {"linear_policy_fwd", "linear_policy_fwd_grad", {"hidden", "weight", "bias"}, "loss", "linear_policy_loss"},
};

struct GradPlan {
  std::string name;
  c10::OperatorHandle with_grads;
  const char* function = nullptr;
  size_t num_args = 0, num_returns = 0;  // the forward's
  std::vector<uint32_t> diff_inputs;     // forward argument index of each differentiable input
  uint32_t diff_output = 0;              // forward return index of the differentiable output
  std::vector<int> arg_from;             // per with_grads argument: forward argument, or -1 - k: need_<input k>
  std::vector<uint32_t> return_of;       // per forward return: its index among with_grads's
  std::vector<uint32_t> grad_of;         // per differentiable input: d_<input>'s index among with_grads's returns
};

GradPlan make_grad_plan(const ForwardGradient& d, const c10::FunctionSchema& fwd) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(
      (std::string("rlhf_kernels::") + d.with_grads).c_str(), "");
  const c10::FunctionSchema& wg = op.schema();
  const std::string both = "rlhf_kernels::" + std::string(d.forward) + " -> rlhf_kernels::" + d.with_grads;
  GradPlan p{std::string(d.forward) + "Backward", op, d.function};
  p.num_args = fwd.arguments().size();
  p.num_returns = fwd.returns().size();
  p.diff_inputs = tensor_arguments(fwd, d.inputs, both, d.forward);
  for (const char* name : d.inputs) {
    const int g = find(wg.returns(), std::string("d_") + name);
    TORCH_CHECK(g >= 0, both, ": ", d.with_grads, " returns no d_", name, " (", wg, ")");
    p.grad_of.push_back(static_cast<uint32_t>(g));
  }
  const int out = find(fwd.returns(), d.output);
  TORCH_CHECK(out >= 0, both, ": the differentiable output '", d.output, "' is not a named return of ", d.forward);
  p.diff_output = static_cast<uint32_t>(out);
  for (const c10::Argument& r : fwd.returns()) {
    const int j = find(wg.returns(), r.name());
    TORCH_CHECK(j >= 0, both, ": ", d.with_grads, " does not return ", d.forward, "'s output '", r.name(), "'");
    p.return_of.push_back(static_cast<uint32_t>(j));
  }
  std::vector<bool> used(p.num_args, false);
  for (const c10::Argument& a : wg.arguments()) {
    const int i = find(fwd.arguments(), a.name());
    if (i >= 0) {
      TORCH_CHECK(fwd.arguments()[i].type()->isSubtypeOf(*a.type()), both, ": '", a.name(), "' is ",
                  fwd.arguments()[i].type()->str(), " in ", d.forward, " but ", a.type()->str(), " in ", d.with_grads);
      used[i] = true;
      p.arg_from.push_back(i);
      continue;
    }
    int k = -1;
    for (size_t n = 0; n < d.inputs.size(); ++n)
      if (a.name() == std::string("need_") + d.inputs[n]) k = static_cast<int>(n);
    TORCH_CHECK(k >= 0 && a.type()->kind() == c10::TypeKind::BoolType, both, ": ", d.with_grads, "'s argument '",
                a.name(), "' is no argument of ", d.forward, " nor bool need_<a differentiable input>");
    p.arg_from.push_back(-1 - k);
  }
  for (size_t i = 0; i < p.num_args; ++i)
    TORCH_CHECK(used[i], both, ": ", d.forward, "'s argument '", fwd.arguments()[i].name(), "' is no argument of ",
                d.with_grads);
  return p;
}

struct GradBackward : public torch::autograd::TraceableFunction {
  explicit GradBackward(const GradPlan* plan) : plan_(plan), grads_(plan->diff_inputs.size()) {}

  std::string name() const override { return plan_->name; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(grads_.size());
    bool found = false;
    for (size_t k = 0; k < grads_.size(); ++k) {
      if (!grads_[k].defined()) continue;
      found = true;
      at::Tensor g = std::move(grads_[k]);  // ours alone now: scaled in place, handed over without a copy
      grads_[k] = at::Tensor();
      if (grads[0].defined()) out[k] = g.mul_(grads[0]);
    }
    TORCH_CHECK(found, plan_->function, ": a second backward through the same call (retain_graph=True?): its "
                "gradients are made by the forward and handed over to the first backward; call ", plan_->function,
                " again");
    return out;
  }

  const GradPlan* plan_;
  variable_list grads_;
};

class GradAutograd final : public Planned<ForwardGradient, GradPlan, make_grad_plan> {
 public:
  explicit GradAutograd(const ForwardGradient* d) : Planned(d) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    const GradPlan& p = plan(op);
    const c10::IValue* args = stack->data() + (stack->size() - p.num_args);
    std::vector<bool> need(p.diff_inputs.size(), false);
    bool record = false;
    for (size_t k = 0; k < need.size(); ++k) {
      const c10::IValue& a = args[p.diff_inputs[k]];
      need[k] = a.isTensor() && a.toTensor().requires_grad();
      record = record || need[k];
    }
    if (!record || !at::GradMode::is_enabled()) return call_below_autograd(op, ks, stack);
    auto node = c10::make_intrusive<GradBackward>(&p);
    connect(*node, args, p.diff_inputs);
    torch::jit::Stack call;
    call.reserve(p.arg_from.size());
    for (int from : p.arg_from) call.push_back(from >= 0 ? args[from] : c10::IValue(bool(need[-1 - from])));
    torch::jit::drop(*stack, p.num_args);
    {
      at::AutoDispatchBelowADInplaceOrView below;
      p.with_grads.callBoxed(call);
    }
    for (size_t k = 0; k < need.size(); ++k)
      if (need[k]) node->grads_[k] = std::move(call[p.grad_of[k]]).toTensor();
    for (uint32_t j : p.return_of) stack->push_back(std::move(call[j]));
    torch::autograd::set_history((*stack)[stack->size() - p.num_returns + p.diff_output].toTensor(), node);
  }
};

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  for (const auto& d : rlhf::autograd::kDerivatives)
    m.impl(d.forward,
           torch::CppFunction::makeFromBoxedFunctor(std::make_unique<rlhf::autograd::SchemaAutograd>(&d)));
  for (const auto& d : rlhf::autograd::kForwardGradients)
    m.impl(d.forward, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<rlhf::autograd::GradAutograd>(&d)));
}
