//! How a rank ended, and the launcher's exit-code policy built on it: a rank's code, or
//! 128+signal for a signal (the shell's convention). Not here: deciding what to do about it.

use std::fmt;
use std::process::ExitStatus;

/// A rank's (or mpirun's) end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankExit {
    Code(i32),
    Signal(i32),
}

/// The exit code a rank uses for bad input (config, data, flags): restarting cannot fix it.
pub const BAD_INPUT_CODE: i32 = 2;

impl RankExit {
    pub fn from_status(s: ExitStatus) -> RankExit {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => RankExit::Code(c),
            (None, Some(sig)) => RankExit::Signal(sig),
            (None, None) => RankExit::Code(1),
        }
    }

    pub fn success(self) -> bool {
        self == RankExit::Code(0)
    }

    /// The launcher's exit code for this end: the code, or 128+signal.
    pub fn code(self) -> i32 {
        match self {
            RankExit::Code(c) => c,
            RankExit::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for RankExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RankExit::Code(c) => write!(f, "exited with code {c}"),
            RankExit::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => write!(f, "was killed by signal {s} ({})", sig.as_str()),
                Err(_) => write!(f, "was killed by signal {s}"),
            },
        }
    }
}

/// Who ended: a rank, or mpirun when it did not say which rank failed (its exit code is still
/// the first failing rank's: OpenMPI returns that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Rank(u32),
    Mpirun,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Rank(r) => write!(f, "rank {r}"),
            Who::Mpirun => f.write_str("a rank under mpirun (mpirun did not say which)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        assert_eq!(RankExit::Signal(9).code(), 137);
        assert_eq!(RankExit::Code(3).code(), 3);
        assert_eq!(
            RankExit::Signal(9).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(RankExit::Code(3).to_string(), "exited with code 3");
        assert_eq!(
            format!("{} {}", Who::Rank(1), RankExit::Signal(15)),
            "rank 1 was killed by signal 15 (SIGTERM)"
        );
    }
}
