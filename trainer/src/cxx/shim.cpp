// trainer/src/cxx/shim.cpp — the few libtorch ops that tch 0.24 does not expose, behind a C ABI
// for trainer/src/optim.rs (bindings in mod.rs): torch's fused AdamW kernel
// (`at::_fused_adamw_`, the one `torch.optim.AdamW(fused=True)` runs), the foreach norm and
// scale that `torch.nn.utils.clip_grad_norm_` uses, setting or clearing a parameter's
// `.grad` (Python's `p.grad = g` / `p.grad = None`), pinning host memory, writing a state
// dict as `torch.save` does (litgpt's lit_model.pth), and the CUDA autocast dtype
// (`torch.autocast("cuda", dtype=torch.bfloat16)`; bindings in trainer/src/autocast.rs).
//
// Not here: any policy (which tensors, which hyper-parameters); that is optim.rs.
//
// Tensors arrive as tch handles, which are `at::Tensor*`. No C++ exception crosses the C ABI:
// every entry point returns nullptr on success or a malloc'd message that the caller releases
// with mla_free_error. Built by trainer/build.rs with the cc crate against the libtorch that
// torch-sys links (same -std and _GLIBCXX_USE_CXX11_ABI).

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

char* copy_message(const char* what) {
  const size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

// Returned when even the error message cannot be allocated; mla_free_error leaves it alone.
char kOutOfMemory[] = "out of memory while reporting a libtorch error";

// Runs `f`, turning any exception into an error message (never nullptr on failure).

template <typename F>
char* guarded(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    char* m = copy_message(e.what_without_backtrace());
    return m != nullptr ? m : kOutOfMemory;
  } catch (const std::exception& e) {
    char* m = copy_message(e.what());
    return m != nullptr ? m : kOutOfMemory;
  } catch (...) {
    char* m = copy_message("unknown C++ exception");
    return m != nullptr ? m : kOutOfMemory;
  }
}

std::vector<at::Tensor> to_list(const at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ts[i] != nullptr, "tensor ", i, " of the list is null");
    TORCH_CHECK(ts[i]->defined(), "tensor ", i, " of the list is undefined");
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

extern "C" {

void mla_free_error(char* message) {
  if (message != kOutOfMemory) {
    std::free(message);
  }
}

// var.grad = grad (shapes, dtype and device must match), or var.grad = None when grad is
// null or undefined: the next backward then hands its fresh gradient over without a copy.
char* mla_set_grad(const at::Tensor* var, const at::Tensor* grad) {
  return guarded([&] {
    TORCH_CHECK(var != nullptr && var->defined(), "set_grad: undefined parameter");
    if (grad == nullptr || !grad->defined()) {
      var->mutable_grad() = at::Tensor();
      return;
    }
    TORCH_CHECK(grad->sizes() == var->sizes(), "set_grad: gradient of shape ", grad->sizes(),
                " for a parameter of shape ", var->sizes());
    TORCH_CHECK(grad->scalar_type() == var->scalar_type(), "set_grad: gradient dtype ",
                grad->scalar_type(), " for a parameter of dtype ", var->scalar_type());
    TORCH_CHECK(grad->device() == var->device(), "set_grad: gradient on ", grad->device(),
                " for a parameter on ", var->device());
    var->mutable_grad() = *grad;
  });
}

// One AdamW step (decoupled decay, torch.optim.AdamW's formula) over n parameters in one
// fused kernel per tensor on CPU, one multi-tensor launch on CUDA. `step` is the 0-dim fp32
// step count already incremented for this step, on the parameters' device. `found_inf`, when
// not null, is a 0-dim fp32 tensor on that device: where it holds 1 the kernel leaves every
// tensor as it was (torch's GradScaler skip), decided on the device without a host sync.
char* mla_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                      const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                      size_t n, const at::Tensor* step, double lr, double beta1, double beta2,
                      double weight_decay, double eps, const at::Tensor* found_inf) {
  return guarded([&] {
    if (n == 0) {
      return;
    }
    TORCH_CHECK(step != nullptr && step->defined(), "fused_adamw: undefined step tensor");
    std::optional<at::Tensor> skip;
    if (found_inf != nullptr) {
      TORCH_CHECK(found_inf->defined() && found_inf->dim() == 0 &&
                      found_inf->scalar_type() == at::kFloat,
                  "fused_adamw: found_inf must be a 0-dim fp32 tensor");
      skip = *found_inf;
    }
    at::NoGradGuard no_grad;
    const std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(to_list(params, n), to_list(grads, n), to_list(exp_avgs, n),
                      to_list(exp_avg_sqs, n), /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, skip);
  });
}

// *out = the global L2 norm of n tensors, a new fp32 0-dim tensor on their device (not
// synchronised to the host): as clip_grad_norm_, the norm of the per-tensor norms.
char* mla_grad_norm(const at::Tensor* const* grads, size_t n, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(out != nullptr, "grad_norm: null output");
    TORCH_CHECK(n > 0, "grad_norm: no gradients");
    at::NoGradGuard no_grad;
    const std::vector<at::Tensor> list = to_list(grads, n);
    std::vector<at::Tensor> norms =
        list[0].scalar_type() == at::kFloat
            ? at::_foreach_norm(list, 2)
            : at::_foreach_norm(list, 2, at::kFloat);
    at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
    *out = new at::Tensor(std::move(total));
  });
}

// Scale n tensors in place by the 0-dim tensor `scale` on their device (gradient clipping with
// a coefficient that never visits the host). On CUDA the multi-tensor kernel runs when `scale`
// has the tensors' dtype; otherwise each tensor is scaled on its own.
char* mla_foreach_mul_tensor_(const at::Tensor* const* tensors, size_t n,
                              const at::Tensor* scale) {
  return guarded([&] {
    if (n == 0) {
      return;
    }
    TORCH_CHECK(scale != nullptr && scale->defined() && scale->dim() == 0,
                "foreach_mul_: the scale must be a 0-dim tensor");
    at::NoGradGuard no_grad;
    at::_foreach_mul_(to_list(tensors, n), *scale);
  });
}

// *out = a copy of the CPU tensor `t` in page-locked memory (torch's pinned-memory cache), for
// an asynchronous copy to the GPU. tch's pin_memory always passes the `device` argument, which
// libtorch deprecates with a warning on every call.
char* mla_pin_memory(const at::Tensor* t, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(t != nullptr && t->defined(), "pin_memory: undefined tensor");
    TORCH_CHECK(out != nullptr, "pin_memory: null output");
    *out = new at::Tensor(t->pin_memory());
  });
}

// Write n named CPU tensors to `path` as Python's `torch.save({name: tensor, ...}, path)` does:
// a zip archive of data.pkl and one record per tensor storage, which `torch.load` reads (with
// weights_only and mmap too) as a plain dict, in this order. Not `torch::pickle_save`: it tags
// typed dicts with `torch.jit._pickle.restore_type_tag`, a global weights_only refuses.
char* mla_save_state_dict(const char* const* names, const at::Tensor* const* tensors, size_t n,
                          const char* path) {
  return guarded([&] {
    TORCH_CHECK(path != nullptr, "save_state_dict: null path");
    c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
    const std::vector<at::Tensor> list = to_list(tensors, n);
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(names[i] != nullptr, "save_state_dict: name ", i, " is null");
      TORCH_CHECK(list[i].device().is_cpu(), "save_state_dict: ", names[i], " is not on the CPU");
      TORCH_CHECK(dict.insert(std::string(names[i]), list[i].contiguous()).second,
                  "save_state_dict: duplicate name ", names[i]);
    }
    std::vector<char> pickled;
    torch::jit::Pickler pickler(
        [&](const char* bytes, size_t len) { pickled.insert(pickled.end(), bytes, bytes + len); },
        /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
        /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
    pickler.protocol();
    pickler.pushIValue(c10::IValue(dict));
    pickler.stop();
    caffe2::serialize::PyTorchStreamWriter archive{std::string(path)};
    torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(),
                                       pickler.tensorData(), archive);
    archive.writeEndOfFile();
  });
}

// Autocast on CUDA computes in bf16 on this thread (libtorch's CUDA default is fp16, and the
// setting is thread-local). A store into libtorch's per-thread dtype table: nothing to report
// (noexcept: should libtorch ever throw here, the process aborts instead of unwinding into
// Rust). The run logs mla_cuda_autocast_dtype_name() after setting it.
void mla_set_cuda_autocast_bf16() noexcept {
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
}

// The dtype autocast on CUDA uses on this thread, e.g. "BFloat16" or "Half" (static storage).
const char* mla_cuda_autocast_dtype_name() {
  try {
    return c10::toString(at::autocast::get_autocast_dtype(at::kCUDA));
  } catch (...) {
    return "unknown";
  }
}

}  // extern "C"
