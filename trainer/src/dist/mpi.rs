//! The `mpi` backend: collectives over MPI_COMM_WORLD with the `mpi` crate (rsmpi) on
//! OpenMPI, for CPU ranks started by mpirun or srun (`mla-launch --device cpu --nproc N`).
//!
//! * all-reduce (sum) in buckets of `dist.bucket_mb`: fp32/fp64 CPU tensors are reduced in
//!   place (the bucket is copied out as the send buffer: MPI_IN_PLACE is not portable through
//!   rsmpi); bf16/fp16 and CUDA tensors are staged per bucket through a host fp32 buffer;
//! * ZeRO's reduce-scatter (`MPI_Reduce_scatter_block`, fp32/fp64; others staged through
//!   host fp32 as above) and all-gather (`MPI_Allgather` of raw bytes, any dtype), one call
//!   each: the caller (optim/zero.rs) hands them bucket-sized pieces;
//! * broadcast of raw bytes (any dtype), barrier, and a host all-reduce for small values;
//! * every collective runs under the [`Watchdog`]: past `dist.timeout_secs` the process ends
//!   with one line naming the rank and the collective;
//! * `finish` calls MPI_Finalize (OpenMPI 4 treats an exit without it as an abort); a
//!   communicator dropped without `finish` (an error path) skips it on purpose, so mpirun
//!   stops the job instead of a finalize waiting for a peer that will never come.
//!
//! Test fault: `stall` (faults.rs, `MLA_TEST_DIST_STALL_RANK=R` for rank R) makes the rank hang
//! in its first gradient all-reduce (to test the timeout). Not here: which backend runs (mod.rs), the NCCL id broadcast uses
//! [`init_world`] from nccl.rs.

use super::watchdog::Watchdog;
use super::{buckets, Communicator, DistError, RankInfo};
use super::{Backend, DistConfig};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use mpi::Threading;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Initialise MPI (MPI_THREAD_FUNNELED: only the main thread calls MPI) and check that it
/// sees the same rank and world size as the environment did.
pub fn init_world(rank: &RankInfo) -> Result<(Universe, SimpleCommunicator), DistError> {
    let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
        .ok_or_else(|| DistError::Setup("MPI was already initialised in this process".into()))?;
    let world = universe.world();
    let (r, n) = (world.rank() as usize, world.size() as usize);
    if (r, n) != (rank.rank, rank.world_size) {
        let msg = format!(
            "MPI sees rank {r} of {n} but the {} environment says rank {} of {}: start CPU ranks with mpirun or srun (mla-launch --device cpu --nproc N does)",
            rank.source, rank.rank, rank.world_size
        );
        // Leave without MPI_Finalize: the other ranks are not in this world.
        std::mem::forget(universe);
        return Err(DistError::Setup(msg));
    }
    Ok((universe, world))
}

/// One rank of an MPI job.
pub struct MpiComm {
    world: SimpleCommunicator,
    /// Taken by `finish` (MPI_Finalize); forgotten on drop otherwise.
    universe: Option<Universe>,
    rank: usize,
    size: usize,
    bucket_mb: usize,
    watchdog: Watchdog,
    stall: bool,
}

impl MpiComm {
    /// `stall`: hang in the first gradient all-reduce (a test fault, faults.rs).
    pub fn init(cfg: &DistConfig, rank: &RankInfo, stall: bool) -> Result<MpiComm, DistError> {
        let (universe, world) = init_world(rank)?;
        Ok(MpiComm {
            world,
            universe: Some(universe),
            rank: rank.rank,
            size: rank.world_size,
            bucket_mb: cfg.bucket_mb,
            watchdog: Watchdog::start(rank.rank, "mpi", Duration::from_secs(cfg.timeout_secs))?,
            stall,
        })
    }

    fn error(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            rank: self.rank,
            op,
            message,
        }
    }

    /// The host type sums of `kind` travel in: fp64 as itself, fp32/bf16/fp16 as fp32.
    fn wire(&self, op: &'static str, kind: Kind) -> Result<Kind, DistError> {
        match kind {
            Kind::Double => Ok(Kind::Double),
            Kind::Float | Kind::BFloat16 | Kind::Half => Ok(Kind::Float),
            k => Err(self.error(op, format!("unsupported dtype {k:?}"))),
        }
    }

    /// The tensor as a flat view (it must be contiguous: a view of the caller's storage).
    fn flat(&self, t: &Tensor, op: &'static str) -> Result<Tensor, DistError> {
        if !t.is_contiguous() {
            return Err(self.error(
                op,
                format!("tensor of shape {:?} is not contiguous", t.size()),
            ));
        }
        Ok(t.view(-1))
    }

    /// Sum `len` elements of type `T` at `ptr` over all ranks, in place.
    ///
    /// SAFETY: `ptr` must point to `len` initialised, exclusively borrowed elements of `T`.
    unsafe fn reduce_raw<T: Equivalence + Copy>(&self, ptr: *mut T, len: usize) {
        // SAFETY: guaranteed by the caller.
        let recv = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        let send = recv.to_vec();
        self.world
            .all_reduce_into(&send[..], recv, SystemOperation::sum());
    }

    /// Sum a flat host tensor of `kind` (Float or Double) in place, bucket by bucket.
    fn reduce_host(&self, flat: &Tensor, kind: Kind) {
        let n = flat.numel();
        for (off, len) in buckets(n, kind.elt_size_in_bytes(), self.bucket_mb) {
            let chunk = flat.narrow(0, off as i64, len as i64);
            let ptr = chunk.data_ptr();
            // SAFETY: `chunk` is a contiguous CPU view of `len` elements of `kind` into the
            // caller's tensor, which the collective borrows mutably for its duration.
            unsafe {
                match kind {
                    Kind::Double => self.reduce_raw(ptr as *mut f64, len),
                    _ => self.reduce_raw(ptr as *mut f32, len),
                }
            }
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> Backend {
        Backend::Mpi
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        if self.stall {
            // Test hook: hang outside the watchdog, as a peer that is gone would look.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let _armed = self.watchdog.arm("all_reduce");
        let flat = self.flat(t, "all_reduce")?;
        let kind = flat.kind();
        let wire = self.wire("all_reduce", kind)?;
        if flat.device() == Device::Cpu && kind == wire {
            self.reduce_host(&flat, kind);
            return Ok(());
        }
        // Staged: each bucket goes to host memory as fp32/fp64, is reduced there, comes back.
        for (off, len) in buckets(flat.numel(), wire.elt_size_in_bytes(), self.bucket_mb) {
            let mut chunk = flat.narrow(0, off as i64, len as i64);
            let staged = chunk.to_device(Device::Cpu).to_kind(wire);
            self.reduce_host(&staged, wire);
            tch::no_grad(|| chunk.copy_(&staged));
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError> {
        const OP: &str = "reduce_scatter";
        let _armed = self.watchdog.arm(OP);
        super::check_chunks(OP, self.rank, self.size, send, recv)?;
        let kind = send.kind();
        let wire = self.wire(OP, kind)?;
        let direct = send.device() == Device::Cpu && recv.device() == Device::Cpu && kind == wire;
        // fp32/fp64 host tensors are reduced where they lie; others through host copies.
        let (s, r) = if direct {
            (send.shallow_clone(), recv.shallow_clone())
        } else {
            (
                send.to_device(Device::Cpu).to_kind(wire).contiguous(),
                Tensor::zeros([recv.numel() as i64], (wire, Device::Cpu)),
            )
        };
        let (n_send, n_recv) = (s.numel(), r.numel());
        // SAFETY: `s` and `r` are contiguous CPU tensors of `wire` with these element counts,
        // distinct (checked by the caller's contract: `recv` does not overlap `send`), and
        // borrowed for the duration of the collective.
        unsafe {
            match wire {
                Kind::Double => self.world.reduce_scatter_block_into(
                    std::slice::from_raw_parts(s.data_ptr() as *const f64, n_send),
                    std::slice::from_raw_parts_mut(r.data_ptr() as *mut f64, n_recv),
                    SystemOperation::sum(),
                ),
                _ => self.world.reduce_scatter_block_into(
                    std::slice::from_raw_parts(s.data_ptr() as *const f32, n_send),
                    std::slice::from_raw_parts_mut(r.data_ptr() as *mut f32, n_recv),
                    SystemOperation::sum(),
                ),
            }
        }
        if !direct {
            tch::no_grad(|| recv.copy_(&r));
        }
        Ok(())
    }

    fn all_gather(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError> {
        const OP: &str = "all_gather";
        let _armed = self.watchdog.arm(OP);
        super::check_chunks(OP, self.rank, self.size, recv, send)?;
        let elt = send.kind().elt_size_in_bytes();
        let host = |t: &Tensor| {
            if t.device() == Device::Cpu {
                t.shallow_clone()
            } else {
                t.to_device(Device::Cpu)
            }
        };
        let (s, r) = (host(send), host(recv));
        // SAFETY: contiguous CPU tensors of `numel × elt` bytes each, distinct (the caller's
        // contract), borrowed for the duration of the collective; any dtype travels as bytes.
        unsafe {
            self.world.all_gather_into(
                std::slice::from_raw_parts(s.data_ptr() as *const u8, s.numel() * elt),
                std::slice::from_raw_parts_mut(r.data_ptr() as *mut u8, r.numel() * elt),
            );
        }
        if recv.device() != Device::Cpu {
            tch::no_grad(|| recv.copy_(&r));
        }
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let _armed = self.watchdog.arm("broadcast");
        let flat = self.flat(t, "broadcast")?;
        let elt = flat.kind().elt_size_in_bytes();
        let root = self.world.process_at_rank(root as i32);
        for (off, len) in buckets(flat.numel(), elt, self.bucket_mb) {
            let mut chunk = flat.narrow(0, off as i64, len as i64);
            let host = if chunk.device() == Device::Cpu {
                chunk.shallow_clone()
            } else {
                chunk.to_device(Device::Cpu)
            };
            // SAFETY: `host` is a contiguous CPU tensor of `len × elt` bytes, not otherwise
            // accessed while the broadcast writes it.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, len * elt) };
            root.broadcast_into(bytes);
            if chunk.device() != Device::Cpu {
                tch::no_grad(|| chunk.copy_(&host));
            }
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        let _armed = self.watchdog.arm("barrier");
        self.world.barrier();
        Ok(())
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<(), DistError> {
        let _armed = self.watchdog.arm("all_reduce (host)");
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DistError> {
        let _armed = self.watchdog.arm("finalize");
        drop(self.universe.take()); // MPI_Finalize
        Ok(())
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if let Some(u) = self.universe.take() {
            std::mem::forget(u);
        }
    }
}
