//! The rank shim: under mpirun each MPI process is `mla-launch --mpi-rank-shim <mla> -- train ...`,
//! which runs the real rank as its child and, when the rank fails, reports how on stderr in one
//! machine line (mpirun tags it with the rank; the launcher turns it into "rank K was killed by
//! signal 9"). mpirun's own failure reports are incomplete and racy; this one is exact.
//!
//! The rank keeps mpirun's environment, stdio and process group, so MPI initialises as if mpirun
//! had started it (like `mpirun nsys profile mla ...`). Signals: SIGTERM/SIGINT/SIGHUP reach the
//! rank through its process group (the launcher and mpirun both signal groups); the shim only
//! waits. Not a general process wrapper.

use crate::status::RankExit;
use std::ffi::OsString;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The hidden first argument that selects the shim.
pub const FLAG: &str = "--mpi-rank-shim";

/// Start of the report line; the rest is `code N` or `signal N`.
pub const REPORT: &str = "@@mla-launch rank-exit ";

/// If argv (without the program name) selects the shim, run it and return its exit code.
pub fn maybe_run(argv: &[OsString]) -> Option<u8> {
    if argv.first().is_none_or(|a| a != FLAG) {
        return None;
    }
    Some(run(&argv[1..]))
}

/// `<program> -- <args>`: the `--` keeps the shim's command line from reading as
/// `mla train` (so `pgrep -f "mla train"` finds the ranks themselves, not their shims).
fn run(cmd: &[OsString]) -> u8 {
    // Taken first: read after the rank is spawned, a parent that died in between (the launcher
    // and mpirun killed while this shim waited for a core) would already be the reaper, and the
    // watch would never see it change.
    let parent = nix::unistd::getppid();
    let Some((program, args)) = cmd.split_first() else {
        eprintln!("mla-launch: error: {FLAG} needs a program to run");
        return 2;
    };
    let args = args
        .strip_prefix(&[OsString::from("--")][..])
        .unwrap_or(args);
    // A handler, not SIG_IGN: handlers reset to default at exec, so the rank still gets the
    // signals (through the process group) while the shim stays to see how it ends.
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        if let Err(e) = signal_hook::flag::register(sig, seen.clone()) {
            eprintln!("mla-launch: error: {FLAG}: installing a signal handler: {e}");
            return 1;
        }
    }
    let mut command = Command::new(program);
    command.args(args);
    crate::proctree::set_parent_death_signal(&mut command);
    let exit = match command.spawn().and_then(|mut c| {
        watch_parent(parent, c.id());
        c.wait()
    }) {
        Ok(status) => RankExit::from_status(status),
        Err(e) => {
            eprintln!(
                "mla-launch: error: starting {}: {e}",
                program.to_string_lossy()
            );
            RankExit::Code(127)
        }
    };
    if !exit.success() {
        // One write: mpirun tags every chunk, so a line split over writes arrives split.
        use std::io::Write;
        let _ = std::io::stderr().write_all(format!("{}\n", report_line(exit)).as_bytes());
    }
    u8::try_from(exit.code()).unwrap_or(1)
}

/// If mpirun dies (killed along with the launcher, say), the shim is re-parented: kill the rank
/// rather than leave it computing alone. mpirun starts the shim, so it cannot set the shim's
/// parent-death signal; polling the parent pid is the portable way. `parent` is the pid the shim
/// started under.
fn watch_parent(parent: nix::unistd::Pid, child: u32) {
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if nix::unistd::getppid() != parent {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return;
        }
    });
}

pub fn report_line(exit: RankExit) -> String {
    match exit {
        RankExit::Code(c) => format!("{REPORT}code {c}"),
        RankExit::Signal(s) => format!("{REPORT}signal {s}"),
    }
}

/// Parse the text of a report line (after mpirun's tag).
pub fn parse_report(text: &str) -> Option<RankExit> {
    let rest = text.trim_end().strip_prefix(REPORT)?;
    let (kind, n) = rest.split_once(' ')?;
    let digits = n.bytes().take_while(u8::is_ascii_digit).count();
    let n = n[..digits].parse().ok()?;
    match kind {
        "code" => Some(RankExit::Code(n)),
        "signal" => Some(RankExit::Signal(n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips() {
        for e in [RankExit::Code(3), RankExit::Signal(9)] {
            assert_eq!(parse_report(&format!("{}\n", report_line(e))), Some(e));
        }
        assert_eq!(parse_report("rank-exit code 3"), None);
    }

    #[test]
    fn only_the_flag_selects_the_shim() {
        assert_eq!(maybe_run(&["--gpus".into()]), None);
        assert_eq!(maybe_run(&[]), None);
    }
}
