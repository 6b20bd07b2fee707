//! A rehearsal of `scripts/gpu_check.sh` on this GPU-less machine, against fakes that fail the
//! ways a first GPU run can: a test binary that aborts without printing "panicked", one that
//! panics, an `mla` whose training segfaults and whose generate fails, a fake nvidia-smi and a
//! fake CUDA libtorch directory. Every check must still say FAIL, in order, and the script must
//! reach its summary and exit 1 — not stop at the first grep that finds nothing.

mod common;
use common::repo;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn gpu_check_reports_every_check_and_its_summary_whatever_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("device");
    script(
        &dev.join("bin/mla"),
        r#"case "$1" in
  --version) echo "mla 0.0.0 (fake)" ;;
  train) echo "fake mla train: crashing" >&2; kill -SEGV $$ ;;
  *) echo "fake mla $1: failing" >&2; exit 1 ;;
esac"#,
    );
    script(&dev.join("tests/parity"), "kill -ABRT $$");
    script(
        &dev.join("tests/cache"),
        "echo \"thread 'x' panicked at fake.rs:1:1\"; echo 'the reason'; exit 101",
    );
    std::fs::create_dir_all(dev.join("data/tinystories")).unwrap();
    std::fs::write(dev.join("data/tinystories/index.json"), "{}").unwrap();
    let torch_lib = tmp.path().join("venv/site-packages/torch/lib");
    std::fs::create_dir_all(&torch_lib).unwrap();
    std::fs::write(torch_lib.join("libtorch_cuda.so"), "").unwrap();
    let version = torch_lib.join("../version.py");
    std::fs::write(&version, "__version__ = '2.11.0+cu130'\n").unwrap();
    let fake_bin = tmp.path().join("fakebin");
    script(
        &fake_bin.join("nvidia-smi"),
        r#"case "$*" in
  *--query-compute-apps*) exec sleep 60 ;;
  *memory.total*) echo "81559 MiB, 999.99" ;;
  *) echo "Fake GPU 80GB" ;;
esac"#,
    );
    let path = format!(
        "{}:{}",
        fake_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let check = || {
        Command::new("bash")
            .arg(repo().join("scripts/gpu_check.sh"))
            .args(["--torch-lib", torch_lib.to_str().unwrap(), "--steps", "2"])
            .env("GPU_CHECK_DIR", &dev)
            .env("PATH", &path)
            .output()
            .expect("bash runs")
    };
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n--- stderr ---\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "exit 1 when a check failed");
    let verdicts: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
        .collect();
    let expected = [
        "FAIL t. model tests 'parity'",
        "FAIL t. model tests 'cache'",
        "FAIL a.",
        "FAIL b.",
        "FAIL c.",
    ];
    assert_eq!(verdicts.len(), expected.len(), "{verdicts:#?}");
    for (v, e) in verdicts.iter().zip(expected) {
        assert!(v.starts_with(e), "{v:?} should start with {e:?}");
    }
    assert!(
        stdout.contains("  thread 'x' panicked"),
        "the panic is quoted"
    );
    assert!(
        stdout.contains("summary for BENCHMARKS.md") && stdout.contains("Fake GPU 80GB"),
        "the summary is reached"
    );
    assert!(
        stderr.contains("torch 2.11.0+cu130 at"),
        "torch's version is printed"
    );

    // Another torch is refused before any check runs: our binaries link libtorch 2.11.0.
    std::fs::write(&version, "__version__ = '2.10.0+cu128'\n").unwrap();
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("torch 2.10.0+cu128") && stderr.contains("needs torch 2.11.0"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("FAIL"));
}
