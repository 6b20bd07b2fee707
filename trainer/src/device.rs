//! Compute device of one rank: CPU or cuda:LOCAL_RANK, CUDA availability checks, the SDPA
//! backend torch picks, the card's peak FLOP/s (for MFU), peak memory (host VmHWM; on CUDA the
//! device memory in use, sampled), and libtorch's intra-op threads from OMP_NUM_THREADS.
//!
//! Not here: the precision policy (train.rs) or the launcher's GPU count (mla-launch).

use crate::error::BadInput;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The device this rank computes on. `None`: CUDA when available, else CPU.
pub fn select(kind: Option<DeviceKind>, local_rank: usize) -> Result<Device, BadInput> {
    let cuda_devices = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    match kind {
        Some(DeviceKind::Cpu) => Ok(Device::Cpu),
        Some(DeviceKind::Cuda) if cuda_devices == 0 => Err(BadInput(
            "--device cuda: libtorch sees no CUDA device (no GPU, no driver, or a CPU-only libtorch); use --device cpu".into(),
        )),
        Some(DeviceKind::Cuda) if local_rank >= cuda_devices => Err(BadInput(format!(
            "--device cuda: local rank {local_rank} needs cuda:{local_rank} but only {cuda_devices} CUDA device(s) are visible"
        ))),
        Some(DeviceKind::Cuda) => Ok(Device::Cuda(local_rank)),
        None if cuda_devices > local_rank => Ok(Device::Cuda(local_rank)),
        None => Ok(Device::Cpu),
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => match gpu_name(i) {
            Some(name) => format!("cuda:{i} ({name})"),
            None => format!("cuda:{i}"),
        },
        d => format!("{d:?}"),
    }
}

/// torch's SDPA backend choice for these shapes (0 math, 1 flash, 2 efficient, 3 cuDNN):
/// `heads` query heads against `kv_heads` key/value heads (fewer for GQA/MQA, which the model
/// passes with `enable_gqa`, as this probe does).
pub fn sdpa_backend(
    batch: i64,
    (heads, kv_heads): (i64, i64),
    seq: i64,
    head_dims: (i64, i64),
    kind: Kind,
    device: Device,
) -> &'static str {
    let q = Tensor::empty([batch, heads, seq, head_dims.0], (kind, device));
    let k = Tensor::empty([batch, kv_heads, seq, head_dims.0], (kind, device));
    let v = Tensor::empty([batch, kv_heads, seq, head_dims.1], (kind, device));
    let gqa = heads != kv_heads;
    let choice =
        Tensor::internal_fused_sdp_choice(&q, &k, &v, None::<Tensor>, 0.0, true, None, gqa);
    match choice {
        0 => "math",
        1 => "flash",
        2 => "memory-efficient",
        3 => "cuDNN",
        _ => "unknown",
    }
}

/// Name of CUDA device `index` from the driver (None without one). The driver numbers devices
/// as CUDA does (CUDA_VISIBLE_DEVICES applied, CUDA's ordering), unlike `nvidia-smi -i`, whose
/// index is the NVML one: under a mask it named another card and so gave the wrong peak FLOP/s.
pub fn gpu_name(index: usize) -> Option<String> {
    // SAFETY: only probes whether the driver library loads.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    cudarc::driver::result::init().ok()?;
    let dev = cudarc::driver::result::device::get(i32::try_from(index).ok()?).ok()?;
    cudarc::driver::result::device::get_name(dev).ok()
}

/// Dense bf16 tensor-core peak of known cards, FLOP/s (for MFU); None for CPUs and unknown
/// cards. `MLA_PEAK_TFLOPS` overrides.
pub fn peak_flops(device: Device) -> Option<f64> {
    if let Some(t) = std::env::var("MLA_PEAK_TFLOPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        return Some(t * 1e12);
    }
    let Device::Cuda(i) = device else {
        return None;
    };
    let name = gpu_name(i)?.to_uppercase();
    let tflops = [
        ("H200", 989.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("A10G", 70.0),
        ("L4", 121.0),
        ("V100", 125.0),
        ("T4", 65.0),
    ]
    .iter()
    .find(|(k, _)| name.contains(k))
    .map(|(_, t)| *t)?;
    Some(tflops * 1e12)
}

/// Peak resident memory of this process (CPU, VmHWM) in bytes.
pub fn peak_host_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Set libtorch's intra-op threads from `OMP_NUM_THREADS` when it is set (mla-launch sets
/// cores/nproc for CPU ranks, so two ranks do not each start one thread per core). Returns the
/// count applied.
pub fn apply_omp_num_threads() -> Option<i32> {
    let n = std::env::var("OMP_NUM_THREADS")
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&n| n > 0)?;
    tch::set_num_threads(n);
    Some(n)
}

/// Memory free for this process on `device` now, in bytes: on CUDA the driver's free memory
/// (`cuMemGetInfo`); on the CPU `MemAvailable` of /proc/meminfo, lowered to the cgroup's
/// headroom (`memory.max − memory.current`) inside a container with a limit. None when unknown.
pub fn available_memory_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => cuda_context(i)?
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        _ => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kb: u64 = meminfo
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let host = kb * 1024;
            let read = |f: &str| {
                std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            };
            let cgroup = read("memory.max")
                .map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
            Some(cgroup.map_or(host, |c| c.min(host)))
        }
    }
}

/// The CUDA driver context of `cuda:index`, created once; None without a CUDA driver.
fn cuda_context(index: usize) -> Option<&'static std::sync::Arc<cudarc::driver::CudaContext>> {
    static CTX: std::sync::OnceLock<Option<std::sync::Arc<cudarc::driver::CudaContext>>> =
        std::sync::OnceLock::new();
    CTX.get_or_init(|| {
        // SAFETY: only probes whether the driver library loads.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return None;
        }
        cudarc::driver::CudaContext::new(index).ok()
    })
    .as_ref()
}

/// Peak device memory in use on `cuda:index` so far, in bytes: `cuMemGetInfo` (total − free)
/// sampled at each call (the training loop calls it at every log step), the maximum kept.
/// It counts the whole device — the CUDA context, libtorch's caching allocator's reserved
/// pool (≥ torch.cuda.max_memory_reserved at the sample), NCCL buffers and any other process
/// on the card — so it is an upper bound of this run's own peak. None without a CUDA driver.
pub fn peak_gpu_memory_bytes(index: usize) -> Option<u64> {
    static PEAK: AtomicU64 = AtomicU64::new(0);
    let (free, total) = cuda_context(index)?.mem_get_info().ok()?;
    let used = total.saturating_sub(free) as u64;
    Some(PEAK.fetch_max(used, Ordering::Relaxed).max(used))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe asks torch about the shapes the model really passes: GQA/MQA keys and values
    /// with fewer heads than the queries, under `enable_gqa` (q as k misdescribed them).
    #[test]
    fn the_sdpa_probe_takes_grouped_keys_and_values() {
        for kv_heads in [8, 2, 1] {
            let b = sdpa_backend(2, (8, kv_heads), 16, (16, 16), Kind::Float, Device::Cpu);
            assert!(["math", "flash"].contains(&b), "{kv_heads} kv heads: {b}");
        }
    }

    #[test]
    fn no_driver_no_gpu_name() {
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            assert_eq!(gpu_name(0), None);
        }
    }
}
