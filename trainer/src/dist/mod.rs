//! Distributed plumbing: who am I (rank, world size, local rank — from the torchrun, OpenMPI,
//! PMI or Slurm environment), the `Communicator` the training loop all-reduces through (and,
//! with ZeRO, reduce-scatters gradients and all-gathers parameters through: optim/zero.rs),
//! and the choice of backend (DESIGN §5).
//!
//! Backends: `single` (here), `mpi` (mpi.rs, CPU ranks under mpirun/srun) and `nccl` (nccl.rs,
//! one GPU per rank; its unique id travels by MPI or by the TCP rendezvous of rendezvous.rs).
//! Tensors passed to collectives are contiguous; large ones are reduced in buckets of
//! `dist.bucket_mb` ([`buckets`]). A collective that outlives `dist.timeout_secs` ends the
//! process with one line naming the rank and the collective ([`watchdog`]).
//! Not here: what is reduced when (train.rs), starting the ranks (mla-launch).

pub mod config;
pub mod mpi;
pub mod nccl;
pub mod rendezvous;
pub mod watchdog;

pub use config::{Backend, DistConfig, Sharding};
use tch::Device;
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

/// Local-rank variables of each launcher, with the global-rank variable it sets beside them.
const LOCAL_RANK_KEYS: &[(&str, &str)] = &[
    ("SLURM_LOCALID", "SLURM_PROCID"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_RANK"),
    ("MPI_LOCALRANKID", "PMI_RANK"),
    ("PMI_LOCAL_RANK", "PMI_RANK"),
    ("LOCAL_RANK", "RANK"),
];

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
    /// (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); none → a single process. A convention
    /// without a local rank of its own takes another launcher's for the same process (PMI-2
    /// under srun: SLURM_LOCALID).
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
            // The convention's own local rank; else another launcher's, when that launcher
            // numbers this process the same (srun --mpi=pmi2 sets only PMI_RANK/PMI_SIZE
            // beside Slurm's SLURM_PROCID/SLURM_LOCALID); else one node: local = global.
            let own = local_keys.iter().find_map(|k| get(k).map(|v| (*k, v)));
            let borrowed = || {
                LOCAL_RANK_KEYS.iter().find_map(|(local, its_rank)| {
                    let same = get(its_rank).is_some_and(|r| r.trim().parse() == Ok(rank));
                    same.then(|| get(local).map(|v| (*local, v))).flatten()
                })
            };
            let local_rank = match own.or_else(borrowed) {
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
    fn backend(&self) -> Backend;
    /// Element-wise sum over ranks, in place (contiguous tensor on the backend's device).
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError>;
    /// ZeRO's gradient reduction: `send` holds `world_size` equal chunks (contiguous, on the
    /// backend's device); `recv` (one chunk's length, same dtype, not overlapping `send`) gets
    /// the sum over ranks of chunk `rank`.
    fn reduce_scatter_sum(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError>;
    /// ZeRO's parameter gather: `recv` (`world_size` × `send`'s length, same dtype, not
    /// overlapping `send`) gets every rank's `send`, by rank.
    fn all_gather(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError>;
    /// Overwrite `t` on every rank with rank `root`'s values.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError>;
    fn barrier(&self) -> Result<(), DistError>;
    /// Sum small host values over ranks (loss sums, flags, token counts).
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<(), DistError>;
    /// Clean shutdown after a successful run (MPI_Finalize, NCCL communicator destroy). A
    /// communicator dropped without it (an error path) skips the collective shutdown, so a
    /// failing rank exits at once and mpirun/the launcher stop the others.
    fn finish(&mut self) -> Result<(), DistError> {
        Ok(())
    }
}

/// Which backend a run uses: `dist.backend` resolved against world size and device.
/// auto = nccl on CUDA with several ranks, mpi for several CPU ranks, single otherwise.
pub fn choose_backend(
    requested: Backend,
    world_size: usize,
    cuda: bool,
) -> Result<Backend, String> {
    match requested {
        Backend::Auto if world_size == 1 => Ok(Backend::Single),
        Backend::Auto if cuda => Ok(Backend::Nccl),
        Backend::Auto => Ok(Backend::Mpi),
        Backend::Single if world_size > 1 => Err(format!(
            "dist.backend single cannot run {world_size} ranks; use auto, mpi (CPU) or nccl (CUDA)"
        )),
        Backend::Nccl if !cuda => Err(
            "dist.backend nccl needs CUDA tensors (--device cuda); CPU ranks use dist.backend mpi or auto".into(),
        ),
        b => Ok(b),
    }
}

/// The communicator of this rank for `device`. Errors that are the user's (an impossible
/// backend/device combination, ranks not started by mpirun) are `DistError::Setup`.
/// `stall`: a test fault (faults.rs) that makes an MPI rank hang in its first all-reduce.
pub fn connect(
    cfg: &DistConfig,
    rank: &RankInfo,
    device: Device,
    stall: bool,
) -> Result<Box<dyn Communicator>, DistError> {
    let backend =
        choose_backend(cfg.backend, rank.world_size, device.is_cuda()).map_err(DistError::Setup)?;
    Ok(match backend {
        Backend::Single | Backend::Auto => Box::new(Single),
        Backend::Mpi => Box::new(mpi::MpiComm::init(cfg, rank, stall)?),
        Backend::Nccl => Box::new(nccl::NcclComm::init(cfg, rank, device)?),
    })
}

/// Element ranges `(offset, len)` covering `numel` elements in buckets of at most
/// `bucket_mb` MiB of `elt_bytes`-sized elements.
pub fn buckets(numel: usize, elt_bytes: usize, bucket_mb: usize) -> Vec<(usize, usize)> {
    let per = ((bucket_mb.max(1) << 20) / elt_bytes.max(1)).max(1);
    (0..numel)
        .step_by(per)
        .map(|off| (off, per.min(numel - off)))
        .collect()
}

/// Every rank's `values` (all the same length), by rank: each rank writes its slot of a
/// zeroed vector and the sum is the gather. Exact for integers below 2^53.
pub fn all_gather_host(
    comm: &dyn Communicator,
    values: &[f64],
) -> Result<Vec<Vec<f64>>, DistError> {
    let n = values.len();
    let mut all = vec![0.0; n * comm.world_size()];
    all[comm.rank() * n..(comm.rank() + 1) * n].copy_from_slice(values);
    comm.all_reduce_host(&mut all)?;
    Ok(all.chunks(n.max(1)).map(<[f64]>::to_vec).collect())
}

/// Check the shapes of a reduce-scatter or all-gather over `world` ranks: `big` holds `world`
/// chunks of `small`'s length, both contiguous and of one dtype.
pub(crate) fn check_chunks(
    op: &'static str,
    rank: usize,
    world: usize,
    big: &Tensor,
    small: &Tensor,
) -> Result<(), DistError> {
    let fail = |message: String| DistError::Collective { rank, op, message };
    if !big.is_contiguous() || !small.is_contiguous() {
        return Err(fail("tensors must be contiguous".into()));
    }
    if big.kind() != small.kind() {
        return Err(fail(format!(
            "dtypes differ: {:?} and {:?}",
            big.kind(),
            small.kind()
        )));
    }
    if big.numel() != small.numel() * world {
        return Err(fail(format!(
            "{} elements are not {world} chunks of {}",
            big.numel(),
            small.numel()
        )));
    }
    Ok(())
}

/// A reduce-scatter or all-gather over one rank: a copy.
fn copy_one_rank(op: &'static str, from: &Tensor, to: &mut Tensor) -> Result<(), DistError> {
    check_chunks(op, 0, 1, from, to)?;
    tch::no_grad(|| to.copy_(from));
    Ok(())
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
    fn backend(&self) -> Backend {
        Backend::Single
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<(), DistError> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError> {
        copy_one_rank("reduce_scatter", send, recv)
    }
    fn all_gather(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError> {
        copy_one_rank("all_gather", send, recv)
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

    /// Rank 9 of 16, the second process on node 2 (8 per node), as each launcher sets it: only
    /// the variables that launcher exports (besides unrelated ones).
    #[test]
    fn every_launcher_convention_gives_the_local_rank_of_the_node() {
        let slurm = [
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_NNODES", "2"),
        ];
        let with_slurm = |extra: &[(&'static str, &'static str)]| {
            let mut v = slurm.to_vec();
            v.extend_from_slice(extra);
            v
        };
        type Env = Vec<(&'static str, &'static str)>;
        let cases: [(&str, Env, &str); 6] = [
            (
                "torchrun / mla-launch",
                vec![
                    ("RANK", "9"),
                    ("WORLD_SIZE", "16"),
                    ("LOCAL_RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "8"),
                    ("GROUP_RANK", "1"),
                    ("MASTER_ADDR", "node1"),
                    ("MASTER_PORT", "29500"),
                ],
                "torchrun",
            ),
            (
                "mpirun (OpenMPI 4/5)",
                vec![
                    ("OMPI_COMM_WORLD_RANK", "9"),
                    ("OMPI_COMM_WORLD_SIZE", "16"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "8"),
                    ("OMPI_COMM_WORLD_NODE_RANK", "1"),
                    ("PMIX_RANK", "9"),
                    ("PMIX_NAMESPACE", "prterun-node1-1234@1"),
                ],
                "OpenMPI",
            ),
            (
                "PMI-1 (MPICH hydra)",
                vec![
                    ("PMI_RANK", "9"),
                    ("PMI_SIZE", "16"),
                    ("PMI_FD", "6"),
                    ("MPI_LOCALRANKID", "1"),
                    ("MPI_LOCALNRANKS", "8"),
                ],
                "PMI",
            ),
            (
                "srun --mpi=pmi2",
                with_slurm(&[
                    ("PMI_RANK", "9"),
                    ("PMI_SIZE", "16"),
                    ("PMI_FD", "7"),
                    ("PMI_JOBID", "4242.0"),
                ]),
                "PMI",
            ),
            (
                "srun --mpi=pmix",
                with_slurm(&[("PMIX_RANK", "9"), ("PMIX_NAMESPACE", "slurm.pmix.4242.0")]),
                "Slurm",
            ),
            ("srun (no MPI plugin)", slurm.to_vec(), "Slurm"),
        ];
        for (launcher, vars, source) in cases {
            let r = info(&vars).unwrap_or_else(|e| panic!("{launcher}: {e}"));
            assert_eq!(
                (r.rank, r.world_size, r.local_rank, r.source),
                (9, 16, 1, source),
                "{launcher}"
            );
        }
        // Another launcher's local id is borrowed only for the same process: a stale
        // SLURM_LOCALID of another rank (a nested launch) is not.
        let r = info(&[
            ("PMI_RANK", "9"),
            ("PMI_SIZE", "16"),
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(r.local_rank, 9, "no local rank for this process: one node");
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
    fn auto_picks_nccl_on_cuda_mpi_on_cpu_and_single_for_one_rank() {
        assert_eq!(choose_backend(Backend::Auto, 1, true), Ok(Backend::Single));
        assert_eq!(choose_backend(Backend::Auto, 1, false), Ok(Backend::Single));
        assert_eq!(choose_backend(Backend::Auto, 8, true), Ok(Backend::Nccl));
        assert_eq!(choose_backend(Backend::Auto, 2, false), Ok(Backend::Mpi));
        assert_eq!(choose_backend(Backend::Nccl, 1, true), Ok(Backend::Nccl));
        assert_eq!(choose_backend(Backend::Mpi, 2, true), Ok(Backend::Mpi));
    }

    #[test]
    fn impossible_backend_choices_are_one_line_errors() {
        let e = choose_backend(Backend::Single, 2, false).unwrap_err();
        assert!(e.contains("single cannot run 2 ranks"), "{e}");
        let e = choose_backend(Backend::Nccl, 2, false).unwrap_err();
        assert!(e.contains("--device cuda"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn buckets_tile_the_buffer_in_bucket_sized_pieces() {
        let b = buckets(10 << 20, 4, 16); // 40 MiB of f32 in 16 MiB buckets
        assert_eq!(b, [(0, 4 << 20), (4 << 20, 4 << 20), (8 << 20, 2 << 20)]);
        assert_eq!(buckets(5, 4, 25), [(0, 5)]);
        assert!(buckets(0, 4, 25).is_empty());
    }

    #[test]
    fn gathering_on_one_rank_returns_its_values() {
        let g = all_gather_host(&Single, &[1.0, 2.0]).unwrap();
        assert_eq!(g, [vec![1.0, 2.0]]);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(info(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .contains("RANK"));
        assert!(info(&[("RANK", "2"), ("WORLD_SIZE", "2")]).is_err());
    }
}
