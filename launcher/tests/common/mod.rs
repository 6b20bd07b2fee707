//! Test harness for `mla-launch`: a temp dir with fake rank programs (shell scripts passed with
//! `--mla`), a runner with a timeout that captures output, and a leftover-process check. Every
//! process a test starts carries `MLA_TEST_DIR=<unique temp dir>` in its environment, so
//! "nothing left behind" is checked exactly (like `pgrep -f`, but also catching `sleep`s).

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cfg.yaml");
        std::fs::write(&config, "# fake config\n").unwrap();
        Fixture { dir, config }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write an executable `/bin/sh` script (a fake `mla`). `$T` is the temp dir inside it.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\nT=\"$MLA_TEST_DIR\"\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// `mla-launch --mla <script> --config <cfg> <args>`, with this test's marker in the env,
    /// no GPUs (tests opt in with `MLA_GPU_COUNT`) and a known log level.
    pub fn launch(&self, mla: &Path, args: &[&str]) -> Command {
        let mut c = self.launch_raw(&[]);
        c.arg("--mla")
            .arg(mla)
            .arg("--config")
            .arg(&self.config)
            .args(args);
        c
    }

    /// `mla-launch <args>` with the test environment and nothing else.
    pub fn launch_raw(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mla-launch"));
        c.args(args)
            .env("MLA_TEST_DIR", self.path())
            .env("MLA_GPU_COUNT", "0")
            .env("RUST_LOG", "info")
            .env_remove("OMP_NUM_THREADS")
            .stdin(Stdio::null());
        c
    }

    /// Start `cmd` with stdout/stderr going to files in the temp dir.
    pub fn start(&self, mut cmd: Command) -> Running {
        let n = std::fs::read_dir(self.path()).unwrap().count();
        let out = self.path().join(format!("launcher-{n}.out"));
        let err = self.path().join(format!("launcher-{n}.err"));
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        Running {
            child: cmd.spawn().unwrap(),
            out,
            err,
            started: Instant::now(),
        }
    }

    pub fn run(&self, cmd: Command) -> Finished {
        self.start(cmd).finish(Duration::from_secs(30))
    }

    /// Wait until `name` exists in the temp dir (a rank signalling it is up).
    pub fn wait_for_file(&self, name: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.path().join(name).exists() {
            assert!(
                Instant::now() < deadline,
                "{name} did not appear within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send `sig` to the pid a rank wrote into file `name`.
    pub fn kill_pid_in(&self, name: &str, sig: nix::sys::signal::Signal) {
        let pid: i32 = self.read(name).trim().parse().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    /// Processes still alive that this test started: the marker in their command line (what
    /// `pgrep -f` sees) or in their environment.
    pub fn leftovers(&self) -> Vec<String> {
        let marker = self.path().to_str().unwrap().as_bytes().to_vec();
        let me = std::process::id().to_string();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let has = |hay: &[u8]| hay.windows(marker.len()).any(|w| w == marker.as_slice());
            if has(&cmdline) || has(&environ) {
                let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                found.push(format!("pid {name}: {cmd}"));
            }
        }
        found
    }

    /// Wait (bounded) until no process of this test is left.
    pub fn wait_nothing_left(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.leftovers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.assert_nothing_left();
    }

    pub fn assert_nothing_left(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "processes left behind: {left:#?}");
    }
}

pub struct Running {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
    pub started: Instant,
}

#[derive(Debug)]
pub struct Finished {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Running {
    /// Wait until the launcher's stderr contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !std::fs::read_to_string(&self.err)
            .unwrap_or_default()
            .contains(needle)
        {
            assert!(Instant::now() < deadline, "stderr never said {needle:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Wait for the launcher; kill it and fail the test after `within`.
    pub fn finish(mut self, within: Duration) -> Finished {
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if self.started.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "mla-launch still running after {within:?}\nstdout:\n{}\nstderr:\n{}",
                    std::fs::read_to_string(&self.out).unwrap_or_default(),
                    std::fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Finished {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.out).unwrap(),
            stderr: std::fs::read_to_string(&self.err).unwrap(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Finished {
    /// Lines of stdout in sorted order (ranks print concurrently).
    pub fn sorted_stdout(&self) -> Vec<String> {
        let mut v: Vec<String> = self.stdout.lines().map(str::to_string).collect();
        v.sort();
        v
    }

    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\nstderr:\n{}\nstdout:\n{}",
            self.stderr,
            self.stdout
        );
        self
    }
}
