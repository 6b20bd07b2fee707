//! The launcher's process tree, read from `/proc`: every descendant of the launcher (ranks,
//! mpirun and its ranks, anything they started), and signalling it by process group. With the
//! launcher a child subreaper, orphans of a dead rank are re-parented to it, so "no descendant
//! left" means no process left behind; each spawned process gets the parent-death signal
//! ([`set_parent_death_signal`]). Linux only; not a general process library.

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub zombie: bool,
}

/// Parse `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`; comm may hold spaces and `)`.
pub fn parse_stat(stat: &str) -> Option<ProcInfo> {
    let (head, tail) = stat.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let mut f = tail.split_whitespace();
    let state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgid = f.next()?.parse().ok()?;
    Some(ProcInfo {
        pid,
        ppid,
        pgid,
        zombie: state == "Z" || state == "X",
    })
}

/// Every process we can read from `/proc` now.
pub fn snapshot() -> Vec<ProcInfo> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .collect()
}

/// The descendants of `root` (not `root` itself), parents before children.
pub fn descendants(procs: &[ProcInfo], root: i32) -> Vec<ProcInfo> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in procs.iter().filter(|c| c.ppid == p && c.pid != root) {
            out.push(*c);
            frontier.push(c.pid);
        }
    }
    out
}

/// Send `sig` to every live descendant of this process, except the processes in `spare` (mpirun
/// for SIGTERM: it would answer with a fast SIGKILL of its ranks; they get the SIGTERM directly).
/// A descendant leading a process group is signalled through the group (one signal reaches the
/// whole tree under it); the rest one by one. Returns how many live descendants there were.
pub fn signal_descendants(sig: Signal, spare: &[i32]) -> usize {
    let me = std::process::id() as i32;
    let procs = snapshot();
    let live: Vec<ProcInfo> = descendants(&procs, me)
        .into_iter()
        .filter(|p| !p.zombie)
        .collect();
    let leaders: HashSet<i32> = live
        .iter()
        .filter(|p| p.pgid == p.pid && !spare.contains(&p.pid))
        .map(|p| p.pid)
        .collect();
    for p in &live {
        if spare.contains(&p.pid) {
            continue;
        }
        let r = if leaders.contains(&p.pid) {
            killpg(Pid::from_raw(p.pid), sig)
        } else if leaders.contains(&p.pgid) {
            continue; // its group leader's killpg reaches it
        } else {
            kill(Pid::from_raw(p.pid), sig)
        };
        if let Err(e) = r {
            if e != Errno::ESRCH {
                tracing::debug!("signal {sig} to pid {}: {e}", p.pid);
            }
        }
    }
    live.len()
}

/// Reap zombie children that are not `ours` (orphans re-parented to us as subreaper), so they do
/// not linger in the process table. Only specific pids are waited for, never "any child", so the
/// waits on our own ranks are untouched.
pub fn reap_adopted(ours: &[i32]) {
    let me = std::process::id() as i32;
    for p in snapshot() {
        if p.ppid == me && p.zombie && !ours.contains(&p.pid) {
            let _ = waitpid(Pid::from_raw(p.pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// SIGKILL every remaining descendant and reap the adopted ones; gives up after ~`rounds`×20 ms
/// (a process stuck in the kernel cannot be helped). Returns the live descendants left.
pub fn kill_all_descendants(ours: &[i32], rounds: u32) -> usize {
    for _ in 0..rounds {
        reap_adopted(ours);
        if signal_descendants(Signal::SIGKILL, &[]) == 0 {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    reap_adopted(ours);
    signal_descendants(Signal::SIGKILL, &[])
}

/// Make orphaned descendants re-parent to this process instead of init, so they can be found
/// and stopped (Linux `PR_SET_CHILD_SUBREAPER`).
pub fn become_subreaper() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!("PR_SET_CHILD_SUBREAPER: {e}");
    }
}

/// Ranks die with the launcher (SIGKILL when the launcher's main thread exits, even by SIGKILL),
/// so a killed launcher leaves no GPU-holding orphans. Spawns happen on the main thread, which
/// lives as long as the launcher: PR_SET_PDEATHSIG fires on the *thread's* exit.
#[cfg(target_os = "linux")]
pub(crate) fn set_parent_death_signal(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: runs between fork and exec; prctl and getppid are async-signal-safe and the
    // closure allocates nothing (the error is built from a raw errno).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != parent {
                // The launcher died before prctl took effect.
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn set_parent_death_signal(_cmd: &mut std::process::Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm_parses() {
        let p = parse_stat("1234 (a) b (c)) S 1200 1234 1200 0 -1 4194560 0").unwrap();
        assert_eq!((p.pid, p.ppid, p.pgid, p.zombie), (1234, 1200, 1234, false));
        let z = parse_stat("7 (x) Z 1 7 7").unwrap();
        assert!(z.zombie);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn descendants_walks_the_tree() {
        let p = |pid, ppid| ProcInfo {
            pid,
            ppid,
            pgid: pid,
            zombie: false,
        };
        let procs = [p(1, 0), p(10, 1), p(11, 10), p(12, 11), p(20, 1), p(30, 99)];
        let mut d: Vec<i32> = descendants(&procs, 10).iter().map(|p| p.pid).collect();
        d.sort();
        assert_eq!(d, [11, 12]);
    }

    #[test]
    fn snapshot_sees_this_process() {
        let me = std::process::id() as i32;
        assert!(snapshot().iter().any(|p| p.pid == me));
    }
}
