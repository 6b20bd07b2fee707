//! Supervision of one attempt: start the processes of a plan (each in its own process group),
//! stream their output, and react to exits and to signals sent to the launcher:
//! - a rank fails (non-zero exit or signal) → SIGTERM everything left, SIGKILL after the grace
//!   period, report the first failure;
//! - SIGINT/SIGTERM/SIGHUP to the launcher → SIGTERM every rank (they checkpoint and exit 0),
//!   SIGKILL after the stop timeout; a second signal kills at once.
//!
//! Every attempt ends with no descendant left (`proctree`). Not here: restarts (`lib.rs`).

use crate::output::{self, Blame, Sink};
use crate::plan::{display_cmd, Plan, ProcSpec};
use crate::proctree;
use crate::status::{RankExit, Who};
use anyhow::Context;
use nix::sys::signal::Signal;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the supervisor reacts to: exits (from one waiter thread per process) and signals.
#[derive(Debug)]
pub enum Event {
    Exited {
        attempt: u32,
        member: usize,
        exit: RankExit,
    },
    Signal(i32),
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every rank exited 0 on its own.
    Succeeded,
    /// `who` failed first; the rest were stopped. `signalled`: the launcher was also signalled
    /// while stopping them (so no restart).
    Failed {
        who: Who,
        exit: RankExit,
        signalled: bool,
    },
    /// The launcher was signalled and stopped the ranks; `bad` is the first that did not exit 0.
    Interrupted { bad: Option<(Who, RankExit)> },
}

struct Member {
    who: Who,
    pid: i32,
    is_mpirun: bool,
    blame: Option<Blame>,
    pumps: Vec<JoinHandle<()>>,
    exit: Option<RankExit>,
}

/// After SIGKILL, how long to wait for exits before giving up on a process stuck in the kernel.
const AFTER_KILL: Duration = Duration::from_secs(5);
/// How long to wait for a dead process's output to drain.
const DRAIN: Duration = Duration::from_secs(2);

pub struct Supervisor<'a> {
    pub plan: &'a Plan,
    pub tx: Sender<Event>,
    pub rx: &'a Receiver<Event>,
}

impl Supervisor<'_> {
    /// Run attempt number `attempt` (0 = first) of `procs` to its end.
    pub fn run_attempt(&self, attempt: u32, procs: &[ProcSpec]) -> anyhow::Result<Outcome> {
        let mut members = Vec::with_capacity(procs.len());
        // A lone rank 0 gets our stdout/stderr as they are, so progress bars and colours see
        // the terminal; with several ranks every line goes through us so lines never mix.
        let lone = procs.len() == 1 && procs[0].rank == Some(0) && !self.plan.prefix_rank0;
        for (i, spec) in procs.iter().enumerate() {
            match self.spawn(attempt, i, spec, lone) {
                Ok(m) => members.push(m),
                Err(e) => {
                    self.cleanup(&members);
                    return Err(e);
                }
            }
        }
        let outcome = self.supervise(attempt, &mut members);
        self.cleanup(&members);
        Ok(outcome)
    }

    fn spawn(
        &self,
        attempt: u32,
        index: usize,
        spec: &ProcSpec,
        inherit_stdio: bool,
    ) -> anyhow::Result<Member> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args).stdin(Stdio::null());
        for k in &spec.env_remove {
            cmd.env_remove(k);
        }
        cmd.envs(spec.env_set.iter().map(|(k, v)| (k, v)));
        // Own process group: the terminal's Ctrl-C reaches only the launcher (which forwards one
        // SIGTERM), and one killpg reaches everything the rank started.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        crate::proctree::set_parent_death_signal(&mut cmd);
        if inherit_stdio {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let who = spec.rank.map_or(Who::Mpirun, Who::Rank);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {}: {}",
                who,
                display_cmd(&spec.program, &spec.args)
            )
        })?;
        let pid = child.id() as i32;
        let mut pumps = Vec::new();
        let mut blame = None;
        match spec.rank {
            Some(rank) if !inherit_stdio => {
                let prefix = output::rank_prefix(rank, self.plan.prefix_rank0);
                if let Some(o) = child.stdout.take() {
                    pumps.push(output::pump(o, Sink::Stdout, prefix.clone()));
                }
                if let Some(e) = child.stderr.take() {
                    pumps.push(output::pump(e, Sink::Stderr, prefix));
                }
            }
            Some(_) => {}
            None => {
                let b = Blame::default();
                if let Some(o) = child.stdout.take() {
                    pumps.push(output::pump_mpirun(o, self.plan.prefix_rank0, b.clone()));
                }
                if let Some(e) = child.stderr.take() {
                    pumps.push(output::pump_mpirun(e, self.plan.prefix_rank0, b.clone()));
                }
                blame = Some(b);
            }
        }
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let exit = match child.wait() {
                Ok(s) => RankExit::from_status(s),
                Err(_) => RankExit::Code(1),
            };
            let _ = tx.send(Event::Exited {
                attempt,
                member: index,
                exit,
            });
        });
        Ok(Member {
            who,
            pid,
            is_mpirun: spec.rank.is_none(),
            blame,
            pumps,
            exit: None,
        })
    }

    fn supervise(&self, attempt: u32, members: &mut [Member]) -> Outcome {
        let plan = self.plan;
        // mpirun answers SIGTERM by killing its ranks within a second: spare it, signal the ranks.
        let spare: Vec<i32> = members
            .iter()
            .filter(|m| m.is_mpirun)
            .map(|m| m.pid)
            .collect();
        let ours: Vec<i32> = members.iter().map(|m| m.pid).collect();
        let mut remaining = members.len();
        let mut first_bad: Option<(Who, RankExit)> = None;
        let mut interrupted = false;
        // A failure came before any signal: the outcome is that failure.
        let mut failed_first = false;
        let mut deadline: Option<Instant> = None;
        let mut killed = false;
        while remaining > 0 {
            let tick = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            match self.rx.recv_timeout(tick) {
                Ok(Event::Exited {
                    attempt: a,
                    member,
                    exit,
                }) if a == attempt => {
                    remaining -= 1;
                    let m = &mut members[member];
                    m.exit = Some(exit);
                    let (who, exit) = match &m.blame {
                        Some(b) if !exit.success() => {
                            drain(&mut m.pumps, DRAIN);
                            match *b.lock().unwrap_or_else(|p| p.into_inner()) {
                                Some((rank, rexit)) => (Who::Rank(rank), rexit),
                                None => (m.who, exit),
                            }
                        }
                        _ => (m.who, exit),
                    };
                    if exit.success() {
                        tracing::debug!("{who} exited with code 0");
                        continue;
                    }
                    if first_bad.is_some() || interrupted {
                        tracing::info!("{who} {exit} while stopping");
                        first_bad.get_or_insert((who, exit));
                        continue;
                    }
                    first_bad = Some((who, exit));
                    failed_first = true;
                    tracing::error!(
                        "{who} {exit}; stopping the other ranks (SIGTERM, SIGKILL after {:.0?})",
                        plan.grace
                    );
                    proctree::signal_descendants(Signal::SIGTERM, &spare);
                    deadline = Some(Instant::now() + plan.grace);
                }
                Ok(Event::Exited { .. }) => {} // a process of an earlier attempt
                Ok(Event::Signal(sig)) => {
                    let name = signal_name(sig);
                    if interrupted {
                        tracing::warn!("{name} again: killing all ranks now");
                        proctree::signal_descendants(Signal::SIGKILL, &[]);
                        killed = true;
                        deadline = Some(Instant::now() + AFTER_KILL);
                    } else if first_bad.is_some() {
                        interrupted = true;
                        tracing::warn!(
                            "{name}: already stopping after a failure; will not restart"
                        );
                    } else {
                        interrupted = true;
                        tracing::info!(
                            "{name}: asking every rank to checkpoint and exit (SIGTERM; SIGKILL after {:.0?}; \
                             send {name} again to kill now)",
                            plan.stop_timeout
                        );
                        proctree::signal_descendants(Signal::SIGTERM, &spare);
                        deadline = Some(Instant::now() + plan.stop_timeout);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    proctree::reap_adopted(&ours);
                    match deadline {
                        Some(d) if Instant::now() >= d => {
                            if killed {
                                tracing::error!(
                                    "{remaining} process(es) did not exit after SIGKILL; giving up on them"
                                );
                                break;
                            }
                            let left: Vec<String> = members
                                .iter()
                                .filter(|m| m.exit.is_none())
                                .map(|m| m.who.to_string())
                                .collect();
                            tracing::warn!(
                                "{} still running after SIGTERM: sending SIGKILL",
                                left.join(", ")
                            );
                            proctree::signal_descendants(Signal::SIGKILL, &[]);
                            killed = true;
                            deadline = Some(Instant::now() + AFTER_KILL);
                        }
                        _ => {}
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break, // cannot happen: we hold a sender
            }
        }
        match (first_bad, failed_first) {
            (Some((who, exit)), true) => Outcome::Failed {
                who,
                exit,
                signalled: interrupted,
            },
            (bad, _) if interrupted => Outcome::Interrupted { bad },
            (Some((who, exit)), _) => Outcome::Failed {
                who,
                exit,
                signalled: false,
            },
            (None, _) => Outcome::Succeeded,
        }
    }

    /// Leave nothing behind: kill whatever is left of the tree (orphans of dead ranks included),
    /// reap adopted zombies, let the output drain.
    fn cleanup(&self, members: &[Member]) {
        let ours: Vec<i32> = members.iter().map(|m| m.pid).collect();
        let left = proctree::kill_all_descendants(&ours, 250);
        if left > 0 {
            tracing::error!("{left} descendant process(es) survived SIGKILL");
        }
        let deadline = Instant::now() + DRAIN;
        for m in members {
            for p in &m.pumps {
                while !p.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

/// Wait (bounded) for output threads to finish, so what a process printed before dying is read.
fn drain(pumps: &mut [JoinHandle<()>], within: Duration) {
    let deadline = Instant::now() + within;
    for p in pumps.iter() {
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}
