//! bf16 autocast on CUDA, for `precision: bf16-mixed`. `tch::autocast` turns CUDA autocast on
//! with libtorch's default dtype for CUDA, which is fp16 (as `torch.autocast("cuda")` without
//! `dtype=`): fp16 without a gradient scaler, not the bf16 the precision names. [`bf16`] sets
//! the dtype to bf16 first; libtorch keeps it per thread, so it is set on the calling thread on
//! every entry (one store). The setter lives in the C++ shim (trainer/src/cxx/shim.cpp).

use std::ffi::{c_char, CStr};

extern "C" {
    fn mla_set_cuda_autocast_bf16();
    fn mla_cuda_autocast_dtype_name() -> *const c_char;
}

/// Run `f` under CUDA autocast in bf16 when `enabled` (a no-op without CUDA, as
/// `tch::autocast`).
pub fn bf16<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if enabled {
        set_cuda_bf16();
    }
    tch::autocast(enabled, f)
}

/// Make CUDA autocast on this thread compute in bf16.
pub fn set_cuda_bf16() {
    // SAFETY: no arguments; one store into libtorch's thread-local autocast dtype table.
    unsafe { mla_set_cuda_autocast_bf16() }
}

/// The dtype CUDA autocast uses on this thread, as libtorch names it ("BFloat16", "Half").
pub fn cuda_dtype_name() -> String {
    // SAFETY: the shim returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(mla_cuda_autocast_dtype_name()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_sets_the_cuda_autocast_dtype_that_libtorch_defaults_to_fp16() {
        // A fresh thread: the dtype is thread-local.
        std::thread::spawn(|| {
            assert_eq!(cuda_dtype_name(), "Half", "libtorch's CUDA default");
            assert_eq!(bf16(false, || 1), 1);
            assert_eq!(cuda_dtype_name(), "Half", "disabled leaves the dtype alone");
            assert_eq!(bf16(true, || 2), 2);
            assert_eq!(cuda_dtype_name(), "BFloat16");
        })
        .join()
        .unwrap();
    }
}
