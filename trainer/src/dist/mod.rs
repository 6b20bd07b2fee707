//! Distributed plumbing: who am I (rank, world size, local rank — from the torchrun, OpenMPI,
//! PMI or Slurm environment) and the `Communicator` the training loop all-reduces through.
//!
//! Backends: `single` (here), `mpi` and `nccl` (issue #5). Tensors passed to collectives are
//! contiguous and live on the communicator's device.

use tch::Tensor;

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Which launcher convention supplied it (for logs).
    pub source: &'static str,
}

impl RankInfo {
    pub fn single() -> RankInfo {
        RankInfo {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            source: "single process",
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Read the rank from the environment: torchrun/mla-launch (RANK, WORLD_SIZE,
    /// LOCAL_RANK), then OpenMPI (OMPI_COMM_WORLD_*), PMI (PMI_RANK/PMI_SIZE), Slurm
    /// (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); none → a single process.
    pub fn from_env() -> Result<RankInfo, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RankInfo, String> {
        let conventions: [(&str, &str, &str, &[&str]); 4] = [
            ("torchrun", "RANK", "WORLD_SIZE", &["LOCAL_RANK"]),
            (
                "OpenMPI",
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                &["OMPI_COMM_WORLD_LOCAL_RANK"],
            ),
            (
                "PMI",
                "PMI_RANK",
                "PMI_SIZE",
                &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"],
            ),
            ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", &["SLURM_LOCALID"]),
        ];
        for (source, rank_key, size_key, local_keys) in conventions {
            let (Some(rank), Some(size)) = (get(rank_key), get(size_key)) else {
                continue;
            };
            let parse = |key: &str, v: &str| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("{key}={v:?} is not a number ({source} environment)"))
            };
            let rank = parse(rank_key, &rank)?;
            let world_size = parse(size_key, &size)?;
            let local_rank = match local_keys.iter().find_map(|k| get(k).map(|v| (*k, v))) {
                Some((k, v)) => parse(k, &v)?,
                None => rank,
            };
            if world_size == 0 || rank >= world_size {
                return Err(format!(
                    "{rank_key}={rank} is not below {size_key}={world_size} ({source} environment)"
                ));
            }
            return Ok(RankInfo {
                rank,
                world_size,
                local_rank,
                source,
            });
        }
        Ok(RankInfo::single())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rank {rank}: {op} failed: {message}")]
    Collective {
        rank: usize,
        op: &'static str,
        message: String,
    },
    #[error("rank {rank}: {op} timed out after {secs} s (a peer is gone or hung)")]
    Timeout {
        rank: usize,
        op: &'static str,
        secs: u64,
    },
    #[error("{0}")]
    Setup(String),
}

/// Collectives the training loop needs. Sums, not means: callers divide.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn backend(&self) -> &'static str;
    /// Element-wise sum over ranks, in place (contiguous tensor on the backend's device).
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError>;
    /// Overwrite `t` on every rank with rank `root`'s values.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError>;
    fn barrier(&self) -> Result<(), DistError>;
    /// Sum small host values over ranks (loss sums, flags, token counts).
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<(), DistError>;
}

/// One process, nothing to communicate.
#[derive(Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_host(&self, _values: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn info(vars: &[(&str, &str)]) -> Result<RankInfo, String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankInfo::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn reads_each_launcher_convention() {
        let t = info(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")]).unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.local_rank, t.source),
            (3, 8, 1, "torchrun")
        );
        let m = info(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(
            (m.rank, m.world_size, m.local_rank, m.source),
            (1, 2, 1, "OpenMPI")
        );
        let s = info(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (9, 16, 1));
        let p = info(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]).unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank), (2, 4, 2));
        assert_eq!(info(&[]).unwrap(), RankInfo::single());
    }

    #[test]
    fn torchrun_variables_win_over_slurm_ones() {
        let t = info(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap();
        assert_eq!(t.source, "torchrun");
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(info(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .contains("RANK"));
        assert!(info(&[("RANK", "2"), ("WORLD_SIZE", "2")]).is_err());
    }
}
