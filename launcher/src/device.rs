//! Device selection: how many NVIDIA GPUs are visible (without libtorch or CUDA), and which
//! device and rank count a launch uses given `--gpus` / `--device` / `--nproc`.
//! Not here: what a rank does with its device (the trainer picks `cuda:LOCAL_RANK`).

use crate::cli::Device;
use crate::BadInput;
use std::path::Path;
use std::process::{Command, Stdio};

/// Overrides GPU detection (a count), for machines where detection cannot see the GPUs and
/// for tests of the CUDA path on machines without one.
pub const GPU_COUNT_ENV: &str = "MLA_GPU_COUNT";

/// Visible GPUs and how we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProbe {
    pub count: u32,
    /// What was looked at, for messages: "/dev/nvidia*: 8, CUDA_VISIBLE_DEVICES=0,1".
    pub source: String,
}

/// Count visible NVIDIA GPUs: `MLA_GPU_COUNT` if set; else the devices present (`/dev/nvidiaN`,
/// else `/proc/driver/nvidia/gpus/*`, else `nvidia-smi -L`), narrowed by `CUDA_VISIBLE_DEVICES`.
pub fn probe_gpus() -> Result<GpuProbe, BadInput> {
    if let Ok(v) = std::env::var(GPU_COUNT_ENV) {
        let count = v
            .trim()
            .parse()
            .map_err(|_| BadInput(format!("{GPU_COUNT_ENV}={v:?} is not a GPU count")))?;
        return Ok(GpuProbe {
            count,
            source: format!("{GPU_COUNT_ENV}={v}"),
        });
    }
    let (present, mut source) = present_gpus();
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    if let Some(v) = &cvd {
        source.push_str(&format!(", CUDA_VISIBLE_DEVICES={v:?}"));
    }
    Ok(GpuProbe {
        count: visible_count(present, cvd.as_deref()),
        source,
    })
}

/// GPUs present on the machine (or container), ignoring CUDA_VISIBLE_DEVICES.
fn present_gpus() -> (u32, String) {
    let dev = count_entries(Path::new("/dev"), |n| {
        n.strip_prefix("nvidia")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    });
    if dev > 0 {
        return (dev, format!("/dev/nvidia*: {dev}"));
    }
    let proc_gpus = count_entries(Path::new("/proc/driver/nvidia/gpus"), |_| true);
    if proc_gpus > 0 {
        return (proc_gpus, format!("/proc/driver/nvidia/gpus: {proc_gpus}"));
    }
    let smi = Command::new("nvidia-smi")
        .arg("-L")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match smi {
        Ok(out) if out.status.success() => {
            let n = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count() as u32;
            (n, format!("nvidia-smi -L: {n}"))
        }
        _ => (
            0,
            "no /dev/nvidia*, no /proc/driver/nvidia/gpus, no nvidia-smi".to_string(),
        ),
    }
}

fn count_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> u32 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_str().is_some_and(&keep))
                .count() as u32
        })
        .unwrap_or(0)
}

/// CUDA's rule for CUDA_VISIBLE_DEVICES: a comma-separated list of indices, UUIDs or MIG ids,
/// read up to the first invalid entry (a negative index such as `-1` hides everything after it);
/// empty hides all GPUs. Never more than are present.
pub fn visible_count(present: u32, cuda_visible_devices: Option<&str>) -> u32 {
    let Some(list) = cuda_visible_devices else {
        return present;
    };
    let listed = list
        .split(',')
        .map(str::trim)
        .take_while(|e| !e.is_empty() && !e.starts_with('-'))
        .count() as u32;
    listed.min(present)
}

/// The device and ranks per node a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub device: Device,
    pub nproc: u32,
    /// Chosen without --device/--gpus (logged so the user knows).
    pub defaulted: bool,
}

/// Resolve `--gpus` / `--device` / `--nproc` against the visible GPUs (`probe` runs only when
/// CUDA is asked for or nothing is said).
pub fn select(
    gpus: Option<u32>,
    device: Option<Device>,
    nproc: Option<u32>,
    probe: impl FnOnce() -> Result<GpuProbe, BadInput>,
) -> Result<Selection, BadInput> {
    if let (Some(g), Some(n)) = (gpus, nproc) {
        if g != n {
            return Err(BadInput(format!(
                "--gpus {g} and --nproc {n} disagree: give one of them"
            )));
        }
    }
    match (device, gpus) {
        (Some(Device::Cpu), Some(_)) => Err(BadInput(
            "--gpus needs CUDA; with --device cpu use --nproc N for N CPU ranks".into(),
        )),
        (Some(Device::Cpu), None) => Ok(Selection {
            device: Device::Cpu,
            nproc: nproc.unwrap_or(1),
            defaulted: false,
        }),
        (Some(Device::Cuda), _) | (None, Some(_)) => {
            let asked = gpus.or(nproc);
            let p = probe()?;
            let flag = match asked {
                Some(n) if gpus.is_some() => format!("--gpus {n}"),
                _ => "--device cuda".to_string(),
            };
            if p.count == 0 {
                return Err(BadInput(format!(
                    "{flag} needs CUDA, but no NVIDIA GPU is visible ({}); use --device cpu to train on the CPU",
                    p.source
                )));
            }
            let n = asked.unwrap_or(p.count);
            if n > p.count {
                return Err(BadInput(format!(
                    "{flag} asks for {n} GPUs but only {} are visible ({})",
                    p.count, p.source
                )));
            }
            Ok(Selection {
                device: Device::Cuda,
                nproc: n,
                defaulted: false,
            })
        }
        (None, None) => {
            let p = probe()?;
            if p.count > 0 {
                if let Some(n) = nproc.filter(|&n| n > p.count) {
                    return Err(BadInput(format!(
                        "{n} ranks per node asked (--nproc or the config's devices) but only {} GPUs are visible ({}); use --device cpu for CPU ranks",
                        p.count, p.source
                    )));
                }
                Ok(Selection {
                    device: Device::Cuda,
                    nproc: nproc.unwrap_or(p.count),
                    defaulted: true,
                })
            } else {
                Ok(Selection {
                    device: Device::Cpu,
                    nproc: nproc.unwrap_or(1),
                    defaulted: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: u32) -> impl FnOnce() -> Result<GpuProbe, BadInput> {
        move || {
            Ok(GpuProbe {
                count: n,
                source: format!("test: {n}"),
            })
        }
    }

    #[test]
    fn cuda_visible_devices_narrows_the_present_gpus() {
        assert_eq!(visible_count(8, None), 8);
        assert_eq!(visible_count(8, Some("0,1")), 2);
        assert_eq!(visible_count(8, Some("")), 0);
        assert_eq!(visible_count(8, Some("-1")), 0);
        assert_eq!(visible_count(8, Some("2,-1,3")), 1);
        assert_eq!(visible_count(8, Some("GPU-1a2b,GPU-3c4d")), 2);
        assert_eq!(visible_count(0, Some("0,1")), 0);
        assert_eq!(visible_count(2, Some("0,1,2,3")), 2);
    }

    #[test]
    fn gpus_without_cuda_is_a_clear_error_suggesting_cpu() {
        let e = select(Some(1), None, None, gpus(0)).unwrap_err().0;
        assert!(e.contains("--gpus 1 needs CUDA"), "{e}");
        assert!(e.contains("--device cpu"), "{e}");
        let e = select(None, Some(Device::Cuda), None, gpus(0))
            .unwrap_err()
            .0;
        assert!(e.contains("--device cuda needs CUDA"), "{e}");
    }

    #[test]
    fn more_gpus_than_visible_is_an_error() {
        let e = select(Some(4), None, None, gpus(2)).unwrap_err().0;
        assert!(e.contains("asks for 4 GPUs but only 2 are visible"), "{e}");
    }

    #[test]
    fn defaults_to_all_gpus_else_one_cpu_rank() {
        let s = select(None, None, None, gpus(4)).unwrap();
        assert_eq!((s.device, s.nproc, s.defaulted), (Device::Cuda, 4, true));
        let s = select(None, None, None, gpus(0)).unwrap();
        assert_eq!((s.device, s.nproc, s.defaulted), (Device::Cpu, 1, true));
        let s = select(None, Some(Device::Cuda), None, gpus(3)).unwrap();
        assert_eq!((s.device, s.nproc), (Device::Cuda, 3));
    }

    #[test]
    fn cpu_never_probes_and_takes_nproc() {
        let never = || -> Result<GpuProbe, BadInput> { panic!("probed") };
        let s = select(None, Some(Device::Cpu), Some(3), never).unwrap();
        assert_eq!((s.device, s.nproc, s.defaulted), (Device::Cpu, 3, false));
        assert!(select(Some(2), Some(Device::Cpu), None, gpus(2)).is_err());
    }

    #[test]
    fn gpus_and_nproc_must_agree() {
        assert!(select(Some(2), None, Some(3), gpus(8)).is_err());
        let s = select(Some(2), None, Some(2), gpus(8)).unwrap();
        assert_eq!(s.nproc, 2);
    }
}
