//! Collective timeouts: a thread that watches the collective in flight and, when one takes
//! longer than `dist.timeout_secs`, prints one line naming the rank, backend and collective
//! and ends the process (exit 1). A blocking MPI call cannot be interrupted and a dead peer
//! over TCP may never be noticed by MPI, so leaving the process is the only way out of the
//! hang; mpirun (or mla-launch) then stops the other ranks.
//!
//! Not here: NCCL's own asynchronous-error polling (nccl.rs returns a `DistError::Timeout`
//! itself and uses this only as a backstop).

use super::DistError;
use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What is in flight: (collective, started).
type InFlight = Arc<Mutex<Option<(&'static str, Instant)>>>;

/// Watches one rank's collectives; dropping it stops the thread.
pub struct Watchdog {
    in_flight: InFlight,
    _stop: Sender<()>,
}

/// The message a timed-out collective ends the process with (no `error:` prefix).
pub fn timeout_message(rank: usize, backend: &str, op: &str, secs: u64) -> String {
    format!(
        "rank {rank}: {backend} {op} timed out after {secs} s (a peer is gone or hung; dist.timeout_secs)"
    )
}

impl Watchdog {
    pub fn start(
        rank: usize,
        backend: &'static str,
        timeout: Duration,
    ) -> Result<Watchdog, DistError> {
        let in_flight: InFlight = Arc::new(Mutex::new(None));
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = Arc::clone(&in_flight);
        let poll = (timeout / 20).clamp(Duration::from_millis(20), Duration::from_secs(1));
        std::thread::Builder::new()
            .name(format!("{backend}-watchdog"))
            .spawn(move || loop {
                match stopped.recv_timeout(poll) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let late = watched
                    .lock()
                    .ok()
                    .and_then(|g| *g)
                    .filter(|(_, t0)| t0.elapsed() >= timeout);
                if let Some((op, _)) = late {
                    let msg = timeout_message(rank, backend, op, timeout.as_secs());
                    let _ = writeln!(std::io::stderr(), "error: {msg}");
                    let _ = std::io::stderr().flush();
                    // SAFETY: _exit ends the process without running destructors or atexit
                    // handlers, which could block on the very collective that hangs.
                    unsafe { libc::_exit(1) };
                }
            })
            .map_err(|e| {
                DistError::Setup(format!("starting the {backend} watchdog thread: {e}"))
            })?;
        Ok(Watchdog {
            in_flight,
            _stop: stop,
        })
    }

    /// Mark `op` as in flight until the returned guard is dropped.
    pub fn arm(&self, op: &'static str) -> Armed<'_> {
        if let Ok(mut g) = self.in_flight.lock() {
            *g = Some((op, Instant::now()));
        }
        Armed(self)
    }
}

/// A collective in flight (see [`Watchdog::arm`]).
pub struct Armed<'a>(&'a Watchdog);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Ok(mut g) = self.0.in_flight.lock() {
            *g = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collective_within_the_timeout_leaves_the_process_alone() {
        let w = Watchdog::start(0, "test", Duration::from_millis(200)).unwrap();
        for _ in 0..5 {
            let _a = w.arm("all_reduce");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(400)); // disarmed: no timeout
    }

    #[test]
    fn the_timeout_message_names_rank_backend_and_collective() {
        let m = timeout_message(1, "mpi", "all_reduce", 600);
        assert_eq!(
            m,
            "rank 1: mpi all_reduce timed out after 600 s (a peer is gone or hung; dist.timeout_secs)"
        );
    }
}
