//! Hostile files and links, end to end through the release `mla` binary (issue 23): every
//! hostile input is made by the test itself, and each must end in one `error:` line and exit 2,
//! under 2 GiB of RSS and within 60 s, with no panic, abort or stack overflow; a symbolic link
//! in an out_dir never makes mla delete or write outside it.
//!
//! Not here: the parsers' own unit tests (the hostile cases in detail, next to the code) and the
//! storage conformance suite's link cases (`storage/tests/conformance.rs`).

mod common;

use common::*;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a measured run of `mla` did.
struct Measured {
    code: Option<i32>,
    stderr: String,
    /// Peak resident set of the process, from `wait4`'s rusage.
    max_rss_bytes: u64,
    elapsed: Duration,
}

/// Run `mla args` in `cwd`, killed after `limit`; its exit, stderr, peak RSS and time.
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its rusage
fn measured(cwd: &Path, args: &[&str], limit: Duration) -> Measured {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mla"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mla starts");
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let (status, rusage) = loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter for wait4.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if r == pid {
            break (status, rusage);
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if started.elapsed() > limit {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Measured {
        code,
        stderr: reader.join().unwrap(),
        max_rss_bytes: rusage.ru_maxrss as u64 * 1024,
        elapsed,
    }
}

/// The acceptance of issue 23 for one hostile input: one `error:` line naming `culprits`, exit
/// 2, under 2 GiB and 60 s, no panic or abort.
fn assert_refused(m: &Measured, culprits: &[&str]) {
    let last = m.stderr.trim_end().lines().last().unwrap_or_default();
    assert_eq!(m.code, Some(2), "exit {:?}, stderr:\n{}", m.code, m.stderr);
    assert!(
        !m.stderr.contains("panicked") && !m.stderr.contains("stack overflow"),
        "{}",
        m.stderr
    );
    assert!(last.starts_with("error: "), "{}", m.stderr);
    for c in culprits {
        assert!(last.contains(c), "names {c}: {last}");
    }
    assert!(
        m.max_rss_bytes < 2 << 30,
        "peak RSS {} MiB",
        m.max_rss_bytes >> 20
    );
    assert!(m.elapsed < Duration::from_secs(60), "{:?}", m.elapsed);
}

/// A directory tree and a file outside every out_dir of a test, and their contents.
struct Victim {
    dir: PathBuf,
    file: PathBuf,
}

impl Victim {
    fn new(root: &Path) -> Victim {
        let dir = root.join("victim");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.txt"), b"a").unwrap();
        std::fs::write(dir.join("sub/b.bin"), b"b").unwrap();
        let file = root.join("victim-file.txt");
        std::fs::write(&file, b"keep me\n").unwrap();
        Victim { dir, file }
    }

    fn assert_untouched(&self) {
        assert_eq!(std::fs::read(self.dir.join("a.txt")).unwrap(), b"a");
        assert_eq!(std::fs::read(self.dir.join("sub/b.bin")).unwrap(), b"b");
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.txt", "sub"]);
        assert_eq!(std::fs::read(&self.file).unwrap(), b"keep me\n");
    }
}

fn train_into(cwd: &Path, out: &Path, extra: &[&str]) -> Measured {
    let args = train_args(out.to_str().unwrap(), extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    measured(cwd, &args, Duration::from_secs(120))
}

/// Finding 1: a step directory that is a link to a directory without a manifest. The
/// start-up clean-up used to list through it and delete the target's files, even when the
/// run then failed on missing data.
#[test]
fn a_linked_step_directory_is_unlinked_at_start_up_and_its_target_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = Victim::new(tmp.path());
    let out = tmp.path().join("run");
    std::fs::create_dir(&out).unwrap();
    symlink(&victim.dir, out.join("step-00000001")).unwrap();
    let m = train_into(
        tmp.path(),
        &out,
        &[
            "--data.train_data_path",
            tmp.path().join("no-data").to_str().unwrap(),
        ],
    );
    assert_eq!(m.code, Some(2), "{}", m.stderr);
    victim.assert_untouched();
    assert!(
        m.stderr.contains("symbolic link") && m.stderr.contains("removed the link"),
        "the log says what was removed: {}",
        m.stderr
    );
    assert!(std::fs::symlink_metadata(out.join("step-00000001")).is_err());
}

/// Finding 2 and the metrics files: a link in place of the lock file or of metrics.jsonl is
/// refused with one line and exit 2; what it points to is neither truncated nor appended to.
#[test]
fn a_linked_lock_or_metrics_file_is_refused_and_its_target_kept() {
    for name in [".mla-lock", "metrics.jsonl"] {
        let tmp = tempfile::tempdir().unwrap();
        let victim = Victim::new(tmp.path());
        let out = tmp.path().join("run");
        std::fs::create_dir(&out).unwrap();
        symlink(&victim.file, out.join(name)).unwrap();
        let m = train_into(tmp.path(), &out, &[]);
        assert_refused(&m, &[name, "symbolic link"]);
        victim.assert_untouched();
    }
}

/// A directory inside a committed step that retention prunes, linked out of the out_dir: the
/// link goes with the step, what it points to stays.
#[test]
fn retention_removes_a_link_inside_a_pruned_step_not_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = Victim::new(tmp.path());
    let out = tmp.path().join("run");
    let m = train_into(tmp.path(), &out, &["--train.max_steps", "3"]);
    assert_eq!(m.code, Some(0), "{}", m.stderr);
    symlink(&victim.dir, out.join("step-00000002/linked")).unwrap();
    symlink(&victim.file, out.join("step-00000002/linked.bin")).unwrap();
    let m = train_into(
        tmp.path(),
        &out,
        &["--resume", "auto", "--checkpoint.keep_last", "1"],
    );
    assert_eq!(m.code, Some(0), "{}", m.stderr);
    assert!(!out.join("step-00000002").exists(), "pruned");
    victim.assert_untouched();
}
