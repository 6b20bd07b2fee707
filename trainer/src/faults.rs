//! Faults the end-to-end tests inject into a real `mla train` process, as one value: a
//! gradient made NaN at chosen optimizer steps (the non-finite guard), a stop requested at a
//! chosen step as a signal would (bit-exact resume, checkpoints of a stopped run), and an MPI
//! rank that hangs in its first all-reduce (the collective timeout).
//!
//! A test process can only reach a child through its environment, so the `MLA_TEST_*`
//! variables are read here, once, by `mla train`'s command (`cli/train.rs`), and nowhere else:
//! the training loop and the communicators get a [`Faults`] value, [`Faults::none`] unless a
//! variable is set, and read no environment.
//!
//! Not here: the faults' effects (train/mod.rs, dist/mpi.rs).

use crate::error::BadInput;

/// `3,4`: one gradient of optimizer steps 3 and 4 (1-based) is filled with NaN.
pub const NAN_GRAD_STEPS_ENV: &str = "MLA_TEST_NAN_GRAD_STEPS";
/// `N`: behave as if SIGTERM arrived during optimizer step N (save step N, exit 0), so a test
/// can interrupt a run at an exact step while keeping the run's LR schedule.
pub const STOP_AT_STEP_ENV: &str = "MLA_TEST_STOP_AT_STEP";
/// `R`: rank R hangs in its first gradient all-reduce (MPI).
pub const STALL_RANK_ENV: &str = "MLA_TEST_DIST_STALL_RANK";

/// The faults of one run (none in normal use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub nan_grad_steps: Vec<u64>,
    pub stop_at_step: Option<u64>,
    pub stall_rank: Option<usize>,
}

impl Faults {
    /// No fault: what every run outside the tests has.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// The faults the `MLA_TEST_*` variables ask for; a value that does not parse is an error
    /// naming the variable.
    pub fn from_env() -> Result<Faults, BadInput> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Faults, BadInput> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut faults = Faults::none();
        if let Some(v) = set(NAN_GRAD_STEPS_ENV) {
            faults.nan_grad_steps = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    BadInput(format!("{NAN_GRAD_STEPS_ENV}={v:?}: expected step numbers"))
                })?;
        }
        if let Some(v) = set(STOP_AT_STEP_ENV) {
            faults.stop_at_step = Some(v.trim().parse().map_err(|_| {
                BadInput(format!("{STOP_AT_STEP_ENV}={v:?}: expected a step number"))
            })?);
        }
        if let Some(v) = set(STALL_RANK_ENV) {
            faults.stall_rank = Some(v.trim().parse().map_err(|_| {
                BadInput(format!("{STALL_RANK_ENV}={v:?}: expected a rank number"))
            })?);
        }
        Ok(faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Faults, BadInput> {
        Faults::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn variables_become_faults_and_bad_values_name_their_variable() {
        assert_eq!(from(&[]).unwrap(), Faults::none());
        assert_eq!(from(&[(STOP_AT_STEP_ENV, " ")]).unwrap(), Faults::none());
        let f = from(&[
            (NAN_GRAD_STEPS_ENV, "3, 4"),
            (STOP_AT_STEP_ENV, "0"),
            (STALL_RANK_ENV, "1"),
        ])
        .unwrap();
        assert_eq!(f.nan_grad_steps, [3, 4]);
        assert_eq!(f.stop_at_step, Some(0));
        assert_eq!(f.stall_rank, Some(1));
        for (name, value) in [
            (NAN_GRAD_STEPS_ENV, "3;4"),
            (STOP_AT_STEP_ENV, "-1"),
            (STALL_RANK_ENV, "one"),
        ] {
            let e = from(&[(name, value)]).unwrap_err().0;
            assert!(e.contains(name) && e.contains(value), "{e}");
        }
    }
}
