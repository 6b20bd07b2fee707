//! Safe Rust wrappers over shim.cpp, the C ABI to the libtorch ops tch 0.24 lacks: torch's
//! fused AdamW kernel, the foreach global norm and in-place scale, setting or clearing a
//! parameter's `.grad` (for optim.rs), pinning host memory (train/loss.rs), and writing a state
//! dict in `torch.save`'s format (interop/litgpt.rs). Each wrapper passes tch handles
//! (`at::Tensor*`) and turns the shim's error string into its own [`TorchError`] (so that
//! cxx depends on nothing of the crate); no C++ exception and no panic crosses the boundary.
//! Not here: which tensors or hyper-parameters (optim.rs). The autocast bindings are in
//! autocast.rs.

use std::ffi::{c_char, CStr, CString};
use tch::Tensor;
use torch_sys::C_tensor;

/// A libtorch op failed: the op's name and the shim's (C++ exception's) message. Never a panic.
#[derive(Debug, thiserror::Error)]
#[error("libtorch {op}: {message}")]
pub struct TorchError {
    pub op: &'static str,
    pub message: String,
}

extern "C" {
    fn mla_free_error(message: *mut c_char);
    fn mla_set_grad(var: *const C_tensor, grad: *const C_tensor) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn mla_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        n: usize,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *const C_tensor,
    ) -> *mut c_char;
    fn mla_grad_norm(
        grads: *const *const C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mla_pin_memory(t: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn mla_save_state_dict(
        names: *const *const c_char,
        tensors: *const *const C_tensor,
        n: usize,
        path: *const c_char,
    ) -> *mut c_char;
    fn mla_foreach_mul_tensor_(
        tensors: *const *const C_tensor,
        n: usize,
        scale: *const C_tensor,
    ) -> *mut c_char;
}

/// Ok on a null return, else the shim's message (which is released here).
fn check(op: &'static str, message: *mut c_char) -> Result<(), TorchError> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from the shim, valid until
    // mla_free_error, which is called exactly once, after the copy.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: see above.
    unsafe { mla_free_error(message) };
    Err(TorchError { op, message: text })
}

fn handles(ts: &[Tensor]) -> Vec<*const C_tensor> {
    ts.iter().map(Tensor::as_ptr).collect()
}

/// `var.grad = grad`, or `var.grad = None` for `None` (the next backward then takes over its
/// fresh gradient instead of adding into a buffer). Shape, dtype and device must match.
pub fn set_grad(var: &Tensor, grad: Option<&Tensor>) -> Result<(), TorchError> {
    let g = grad.map_or(std::ptr::null(), Tensor::as_ptr);
    // SAFETY: both handles are live tch tensors borrowed for the call; the shim only reads the
    // handles and updates the autograd metadata shared by every handle of `var`.
    check("set_grad", unsafe { mla_set_grad(var.as_ptr(), g) })
}

/// Hyper-parameters of one fused AdamW call.
#[derive(Debug, Clone, Copy)]
pub struct AdamWArgs {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    pub eps: f64,
}

/// One fused AdamW step (`torch._fused_adamw_`) over matching lists: parameters, gradients
/// and fp32-or-same-dtype moments, all of one dtype and device; `step` is the 0-dim fp32 step
/// count of this update (already incremented) on that device. `found_inf`: a 0-dim fp32
/// tensor on that device; where it holds 1, nothing is updated (decided on the device).
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: &Tensor,
    args: AdamWArgs,
    found_inf: Option<&Tensor>,
) -> Result<(), TorchError> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len()] != [n; 3] {
        return Err(TorchError {
            op: "fused_adamw",
            message: format!(
                "list lengths differ: {n} params, {} grads, {} exp_avg, {} exp_avg_sq",
                grads.len(),
                exp_avgs.len(),
                exp_avg_sqs.len()
            ),
        });
    }
    let (p, g, m, v) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
    );
    // SAFETY: four arrays of n live tensor handles, the step handle and the optional found_inf
    // handle (null for None), all borrowed for the call; the kernel writes only the tensors' data.
    let message = unsafe {
        mla_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step.as_ptr(),
            args.lr,
            args.betas.0,
            args.betas.1,
            args.weight_decay,
            args.eps,
            found_inf.map_or(std::ptr::null(), Tensor::as_ptr),
        )
    };
    check("fused_adamw", message)
}

/// Global L2 norm of `grads` (norm of the per-tensor norms, as `clip_grad_norm_`), a 0-dim
/// fp32 tensor on their device, not synchronised to the host.
pub fn grad_norm(grads: &[Tensor]) -> Result<Tensor, TorchError> {
    let g = handles(grads);
    // SAFETY: an array of live handles borrowed for the call.
    new_tensor("grad_norm", |out| unsafe {
        mla_grad_norm(g.as_ptr(), g.len(), out)
    })
}

/// Run a shim call that returns a new tensor through `out` (a heap `at::Tensor` on success),
/// and take ownership of it.
fn new_tensor(
    op: &'static str,
    call: impl FnOnce(*mut *mut C_tensor) -> *mut c_char,
) -> Result<Tensor, TorchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    check(op, call(&mut out))?;
    if out.is_null() {
        return Err(TorchError {
            op,
            message: "no result".into(),
        });
    }
    // SAFETY: on success the shim stored a new heap `at::Tensor` in `out`, which nothing else
    // owns; the tch Tensor takes it over (freed by its Drop).
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Multiply every tensor of `tensors` in place by the 0-dim tensor `scale` on their device.
pub fn foreach_mul_(tensors: &[Tensor], scale: &Tensor) -> Result<(), TorchError> {
    let t = handles(tensors);
    // SAFETY: an array of live handles and a live scale handle, borrowed for the call; only
    // the tensors' data is written.
    check("foreach_mul_", unsafe {
        mla_foreach_mul_tensor_(t.as_ptr(), t.len(), scale.as_ptr())
    })
}

/// A copy of the CPU tensor `t` in page-locked memory, for an asynchronous copy to the GPU.
pub fn pin_memory(t: &Tensor) -> Result<Tensor, TorchError> {
    // SAFETY: a live handle borrowed for the call.
    new_tensor("pin_memory", |out| unsafe {
        mla_pin_memory(t.as_ptr(), out)
    })
}

/// Write `tensors` (CPU, by name, in this order) to `path` as `torch.save` writes a dict of
/// tensors: the file `torch.load` reads as a state dict (litgpt's lit_model.pth).
pub fn save_state_dict(
    tensors: &[(String, Tensor)],
    path: &std::path::Path,
) -> Result<(), TorchError> {
    let bad = |what: String| TorchError {
        op: "save_state_dict",
        message: what,
    };
    let names = tensors
        .iter()
        .map(|(n, _)| CString::new(n.as_str()).map_err(|_| bad(format!("name {n:?} holds a NUL"))))
        .collect::<Result<Vec<_>, _>>()?;
    let path_c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| bad(format!("path {} holds a NUL", path.display())))?;
    let name_ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let handles: Vec<*const C_tensor> = tensors.iter().map(|(_, t)| t.as_ptr()).collect();
    // SAFETY: n NUL-terminated names, n live tensor handles and a NUL-terminated path, all
    // borrowed for the call; the shim only reads them.
    check("save_state_dict", unsafe {
        mla_save_state_dict(
            name_ptrs.as_ptr(),
            handles.as_ptr(),
            handles.len(),
            path_c.as_ptr(),
        )
    })
}
