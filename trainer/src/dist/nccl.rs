//! The `nccl` backend: one GPU per rank, collectives with NCCL on CUDA tensors (all-reduce and
//! broadcast in buckets; ZeRO's reduce-scatter and all-gather one call each, the caller
//! bucketing), via cudarc's NCCL types and CUDA driver API, all loaded at run time (CPU builds
//! and CI need no CUDA).
//!
//! * Library: NCCL is opened by its soname `libnccl.so.2` (what the `nvidia-nccl-cu13` wheel
//!   and Debian ship, and what libtorch_cuda already loaded), then `libnccl.so`, or the path in
//!   `MLA_NCCL_LIBRARY`. cudarc's own loader only tries names such as `libnccl.so` and
//!   `libnccl.so.13` (cudarc 0.19 `get_lib_name_candidates`), which a pip install does not
//!   have, so the handful of functions used here are resolved with libloading and cudarc's
//!   `nccl::sys` types. A missing library is one line saying where to point LD_LIBRARY_PATH.
//! * Unique id: rank 0 creates it; it goes to the others by the TCP rendezvous at
//!   MASTER_ADDR:MASTER_PORT (rendezvous.rs) whenever those are set, else, under mpirun or
//!   srun with a PMI service (`--mpi=pmix`: PMIX_RANK/PMI_RANK set), by MPI broadcast
//!   ([`id_carrier`]; the log says which); a single rank needs neither.
//! * Streams: collectives are enqueued on the legacy default stream (stream 0), which is
//!   libtorch's current stream unless something sets another, so they are ordered after the
//!   backward kernels that wrote the gradients and before the optimizer's kernels with no extra
//!   synchronisation. The caller then waits (polling `cuStreamQuery` and NCCL's asynchronous
//!   error) until the collective finished, failed, or outlived `dist.timeout_secs`; a timeout
//!   aborts the communicator and returns `DistError::Timeout`. The wait costs nothing extra:
//!   the loop reads the loss on the host right after the gradient all-reduce anyway.
//!
//! Not here: the choice of backend (mod.rs), which device a rank uses (device.rs).

use super::watchdog::Watchdog;
use super::{buckets, rendezvous, Communicator, DistError, RankInfo};
use super::{Backend, DistConfig};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub const LIBRARY_ENV: &str = "MLA_NCCL_LIBRARY";
/// Library names tried, in order, when `MLA_NCCL_LIBRARY` is not set.
pub const LIBRARY_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];
/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

// Results, data types and reduction ops cross the FFI boundary as plain ints, so a value this
// build's enums do not know (a newer NCCL) can never become an invalid Rust enum.
type NcclResult = c_int;
type Stream = *mut c_void;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;

/// The NCCL entry points this backend calls.
pub struct NcclLib {
    _lib: libloading::Library,
    pub name: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
    /// (send, recv, recv count, dtype, op, comm, stream)
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
    /// (send, recv, send count, dtype, comm, stream)
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        ncclComm_t,
        Stream,
    ) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

impl NcclLib {
    /// Open the first of `candidates` that loads and resolve every entry point.
    pub fn open(candidates: &[&str]) -> Result<NcclLib, String> {
        let mut tried = Vec::new();
        for name in candidates {
            // SAFETY: loading NCCL runs its (trivial) initialisers; it is a C library with no
            // Rust-visible global state.
            match unsafe { libloading::Library::new(*name) } {
                Ok(lib) => return Self::resolve(lib, name),
                Err(e) => tried.push(format!("{name} ({e})")),
            }
        }
        Err(format!(
            "NCCL library not found: tried {}; add the directory that holds libnccl.so.2 to LD_LIBRARY_PATH (pip installs it in <venv>/lib/python3.*/site-packages/nvidia/nccl/lib) or set {LIBRARY_ENV}=/path/to/libnccl.so.2",
            tried.join(", ")
        ))
    }

    fn resolve(lib: libloading::Library, name: &str) -> Result<NcclLib, String> {
        macro_rules! sym {
            ($s:literal) => {
                // SAFETY: the function pointer types above are NCCL's C prototypes (nccl.h,
                // stable since NCCL 2.x) with enums as ints.
                *unsafe { lib.get($s) }.map_err(|e| {
                    format!(
                        "{name} has no {} ({e}): not an NCCL 2 library?",
                        String::from_utf8_lossy(&$s[..$s.len() - 1])
                    )
                })?
            };
        }
        Ok(NcclLib {
            name: name.to_string(),
            get_version: sym!(b"ncclGetVersion\0"),
            get_unique_id: sym!(b"ncclGetUniqueId\0"),
            comm_init_rank: sym!(b"ncclCommInitRank\0"),
            all_reduce: sym!(b"ncclAllReduce\0"),
            broadcast: sym!(b"ncclBroadcast\0"),
            reduce_scatter: sym!(b"ncclReduceScatter\0"),
            all_gather: sym!(b"ncclAllGather\0"),
            comm_destroy: sym!(b"ncclCommDestroy\0"),
            comm_abort: sym!(b"ncclCommAbort\0"),
            comm_get_async_error: sym!(b"ncclCommGetAsyncError\0"),
            get_error_string: sym!(b"ncclGetErrorString\0"),
            _lib: lib,
        })
    }

    /// The process-wide library: `MLA_NCCL_LIBRARY`, else [`LIBRARY_NAMES`].
    pub fn get() -> Result<&'static NcclLib, DistError> {
        static LIB: OnceLock<Result<NcclLib, String>> = OnceLock::new();
        LIB.get_or_init(|| match std::env::var(LIBRARY_ENV) {
            Ok(path) if !path.is_empty() => NcclLib::open(&[path.as_str()]),
            _ => NcclLib::open(LIBRARY_NAMES),
        })
        .as_ref()
        .map_err(|e| DistError::Setup(e.clone()))
    }

    /// NCCL's version as (major, minor, patch).
    pub fn version(&self) -> Result<(u32, u32, u32), String> {
        let mut v: c_int = 0;
        // SAFETY: writes one int.
        self.check(unsafe { (self.get_version)(&mut v) })?;
        let v = v as u32;
        // NCCL ≥ 2.9 encodes major·10000 + minor·100 + patch.
        Ok((v / 10000, (v / 100) % 100, v % 100))
    }

    pub fn unique_id(&self) -> Result<ncclUniqueId, String> {
        let mut id = ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: writes one ncclUniqueId.
        self.check(unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    fn error_string(&self, r: NcclResult) -> String {
        // SAFETY: NCCL returns a static string for any code.
        let p = unsafe { (self.get_error_string)(r) };
        if p.is_null() {
            return format!("NCCL error {r}");
        }
        // SAFETY: non-null, NUL-terminated, static.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        format!("{s} (NCCL error {r})")
    }

    fn check(&self, r: NcclResult) -> Result<(), String> {
        if r == NCCL_SUCCESS {
            Ok(())
        } else {
            Err(self.error_string(r))
        }
    }
}

/// The id as the bytes that travel between ranks.
pub fn id_to_bytes(id: &ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|&c| c as u8).collect()
}

pub fn id_from_bytes(bytes: &[u8]) -> Result<ncclUniqueId, DistError> {
    if bytes.len() != UNIQUE_ID_BYTES {
        return Err(DistError::Setup(format!(
            "NCCL unique id: got {} bytes, expected {UNIQUE_ID_BYTES}",
            bytes.len()
        )));
    }
    let mut id = ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    for (d, s) in id.internal.iter_mut().zip(bytes) {
        *d = *s as c_char;
    }
    Ok(id)
}

/// How the unique id travels from rank 0 to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdCarrier {
    /// The TCP rendezvous at MASTER_ADDR:MASTER_PORT.
    Tcp { addr: String, port: String },
    /// An MPI broadcast.
    Mpi,
}

/// How the unique id travels: the TCP rendezvous whenever MASTER_ADDR and MASTER_PORT are set
/// (it needs nothing but the network, while MPI_Init under srun can fail on a PMIx version
/// mismatch between Slurm and OpenMPI); else MPI for ranks started by mpirun or by srun with
/// a PMI service (`--mpi=pmix` sets PMIX_RANK, pmi2 PMI_RANK). Plain srun ranks would each
/// be an MPI world of one: None, and the caller asks for MASTER_ADDR/PORT.
pub fn id_carrier(rank: &RankInfo, env: impl Fn(&str) -> Option<String>) -> Option<IdCarrier> {
    if let (Some(addr), Some(port)) = (env("MASTER_ADDR"), env("MASTER_PORT")) {
        return Some(IdCarrier::Tcp { addr, port });
    }
    let mpi = match rank.source {
        "OpenMPI" | "PMI" => true,
        "Slurm" => env("PMIX_RANK").is_some() || env("PMI_RANK").is_some(),
        _ => false,
    };
    mpi.then_some(IdCarrier::Mpi)
}

fn nccl_kind(kind: Kind) -> Option<c_int> {
    Some(match kind {
        Kind::Float => ncclDataType_t::ncclFloat32 as c_int,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16 as c_int,
        Kind::Half => ncclDataType_t::ncclFloat16 as c_int,
        Kind::Double => ncclDataType_t::ncclFloat64 as c_int,
        Kind::Int64 => ncclDataType_t::ncclInt64 as c_int,
        _ => return None,
    })
}

/// Distribute rank 0's unique id (see the module docs).
fn share_unique_id(
    lib: &NcclLib,
    rank: &RankInfo,
    timeout: Duration,
    mpi: &mut Option<mpi::environment::Universe>,
) -> Result<ncclUniqueId, DistError> {
    let create = || {
        lib.unique_id()
            .map_err(|e| DistError::Setup(format!("ncclGetUniqueId: {e}")))
    };
    if rank.world_size == 1 {
        return create();
    }
    let carrier = id_carrier(rank, |k| std::env::var(k).ok()).ok_or_else(|| {
        DistError::Setup(format!(
            "nccl with {} ranks ({} environment) needs MASTER_ADDR and MASTER_PORT for the unique-id rendezvous (or mpirun / srun --mpi=pmix)",
            rank.world_size, rank.source
        ))
    })?;
    let (addr, port) = match carrier {
        IdCarrier::Mpi => {
            use mpi::traits::{Communicator as _, Root};
            tracing::info!("nccl: the unique id goes to the other ranks by MPI broadcast");
            let (universe, world) = super::mpi::init_world(rank)?;
            let mut bytes = if rank.rank == 0 {
                id_to_bytes(&create()?)
            } else {
                vec![0; UNIQUE_ID_BYTES]
            };
            let watchdog = Watchdog::start(rank.rank, "nccl", timeout)?;
            {
                let _armed = watchdog.arm("unique id broadcast (MPI)");
                world.process_at_rank(0).broadcast_into(&mut bytes[..]);
            }
            *mpi = Some(universe);
            return id_from_bytes(&bytes);
        }
        IdCarrier::Tcp { addr, port } => (addr, port),
    };
    let port: u16 = port
        .trim()
        .parse()
        .map_err(|_| DistError::Setup(format!("MASTER_PORT={port:?} is not a port number")))?;
    tracing::info!(
        "nccl: the unique id goes to the other ranks by the TCP rendezvous at {addr}:{port} (rank 0 listens on every interface)"
    );
    if rank.rank == 0 {
        let listener = rendezvous::listen(&addr, port)?;
        let id = create()?;
        rendezvous::serve(&listener, rank.world_size, &id_to_bytes(&id), timeout)?;
        Ok(id)
    } else {
        id_from_bytes(&rendezvous::fetch(
            &addr,
            port,
            rank.rank,
            rank.world_size,
            timeout,
        )?)
    }
}

/// One rank's NCCL communicator on `cuda:LOCAL_RANK`.
pub struct NcclComm {
    lib: &'static NcclLib,
    comm: ncclComm_t,
    /// The device's primary context (libtorch's), bound to this thread.
    _ctx: Arc<cudarc::driver::CudaContext>,
    device: Device,
    rank: usize,
    size: usize,
    bucket_mb: usize,
    timeout: Duration,
    /// Backstop for a wait that cannot return (a hung driver call): a little after `timeout`.
    watchdog: Watchdog,
    /// MPI, when it carried the unique id: finalised by `finish`.
    mpi: Option<mpi::environment::Universe>,
    /// Live, aborted or destroyed: NCCL frees the communicator in both ncclCommAbort and
    /// ncclCommDestroy, so after either nothing may pass `comm` to NCCL again.
    life: Lifetime,
}

/// The lifetime of a communicator handle: live until the first abort or destroy, which only
/// that first call may perform.
#[derive(Debug, Default)]
struct Lifetime(std::sync::atomic::AtomicU8);

impl Lifetime {
    const LIVE: u8 = 0;
    const ABORTED: u8 = 1;
    const DESTROYED: u8 = 2;

    fn is_live(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) == Self::LIVE
    }

    /// Move from live to `to` and run `end` (the NCCL call that frees the handle); None, and
    /// `end` not run, when the handle was already aborted or destroyed.
    fn end<R>(&self, to: u8, end: impl FnOnce() -> R) -> Option<R> {
        use std::sync::atomic::Ordering;
        self.0
            .compare_exchange(Self::LIVE, to, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| end())
    }

    fn was_aborted(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) == Self::ABORTED
    }
}

impl NcclComm {
    pub fn init(cfg: &DistConfig, rank: &RankInfo, device: Device) -> Result<NcclComm, DistError> {
        let Device::Cuda(index) = device else {
            return Err(DistError::Setup(
                "dist.backend nccl needs --device cuda".into(),
            ));
        };
        let lib = NcclLib::get()?;
        // SAFETY: only probes whether the driver library loads.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DistError::Setup(
                "dist.backend nccl: the CUDA driver library (libcuda.so.1) is not loadable".into(),
            ));
        }
        let ctx = cudarc::driver::CudaContext::new(index)
            .map_err(|e| DistError::Setup(format!("nccl: CUDA context of cuda:{index}: {e:?}")))?;
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let mut mpi = None;
        let id = share_unique_id(lib, rank, timeout, &mut mpi)?;
        let watchdog = Watchdog::start(rank.rank, "nccl", timeout + Duration::from_secs(30))?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        {
            let _armed = watchdog.arm("communicator init (ncclCommInitRank)");
            // SAFETY: `comm` receives a new communicator; the id is 128 plain bytes.
            let r = unsafe {
                (lib.comm_init_rank)(&mut comm, rank.world_size as c_int, id, rank.rank as c_int)
            };
            lib.check(r).map_err(|e| {
                DistError::Setup(format!(
                    "ncclCommInitRank (rank {} of {} on cuda:{index}): {e}",
                    rank.rank, rank.world_size
                ))
            })?;
        }
        Ok(NcclComm {
            lib,
            comm,
            _ctx: ctx,
            device,
            rank: rank.rank,
            size: rank.world_size,
            bucket_mb: cfg.bucket_mb,
            timeout,
            watchdog,
            mpi,
            life: Lifetime::default(),
        })
    }

    fn error(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            rank: self.rank,
            op,
            message,
        }
    }

    /// The tensor as a flat view with its NCCL type, on this rank's device.
    fn flat(&self, t: &Tensor, op: &'static str) -> Result<(Tensor, c_int), DistError> {
        if !self.life.is_live() {
            return Err(self.error(
                op,
                "the communicator was aborted after an earlier failure".into(),
            ));
        }
        if t.device() != self.device {
            return Err(self.error(
                op,
                format!(
                    "tensor on {:?}, communicator on {:?}",
                    t.device(),
                    self.device
                ),
            ));
        }
        if !t.is_contiguous() {
            return Err(self.error(
                op,
                format!("tensor of shape {:?} is not contiguous", t.size()),
            ));
        }
        let kind = nccl_kind(t.kind())
            .ok_or_else(|| self.error(op, format!("unsupported dtype {:?}", t.kind())))?;
        Ok((t.view(-1), kind))
    }

    /// Wait until the work enqueued on the default stream is done, NCCL reports an
    /// asynchronous error, or the timeout passes (then abort the communicator).
    fn wait(&self, op: &'static str) -> Result<(), DistError> {
        use cudarc::driver::sys::{cuStreamQuery, CUresult};
        let _armed = self.watchdog.arm(op);
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: queries the legacy default stream of the current (bound) context.
            match unsafe { cuStreamQuery(std::ptr::null_mut()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.error(op, format!("CUDA error while waiting: {e:?}"))),
            }
            let mut async_err: NcclResult = NCCL_SUCCESS;
            // SAFETY: writes one int.
            let r = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut async_err) };
            if r == NCCL_SUCCESS && async_err != NCCL_SUCCESS && async_err != NCCL_IN_PROGRESS {
                self.abort();
                return Err(self.error(op, self.lib.error_string(async_err)));
            }
            if start.elapsed() >= self.timeout {
                self.abort(); // frees the hung collective's resources
                return Err(DistError::Timeout {
                    rank: self.rank,
                    op,
                    secs: self.timeout.as_secs(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Abort the communicator, once: NCCL's documented recovery from an error or a hang. It
    /// frees the handle, so later calls (a second error, `finish`, `Drop`) leave it alone.
    fn abort(&self) {
        // SAFETY: the handle is live (Lifetime::end runs this at most once, never after a
        // destroy), and nothing touches it afterwards.
        self.life.end(Lifetime::ABORTED, || unsafe {
            (self.lib.comm_abort)(self.comm)
        });
    }

    fn enqueue(&self, op: &'static str, r: NcclResult) -> Result<(), DistError> {
        self.lib.check(r).map_err(|e| self.error(op, e))
    }

    /// Enqueue `call(send, recv, nccl dtype)` once on the flat views of two tensors, then wait
    /// for the stream under the watchdog. The views are contiguous device buffers borrowed from
    /// the caller until `wait` returns.
    fn out_of_place(
        &self,
        op: &'static str,
        send: &Tensor,
        recv: &Tensor,
        call: impl Fn(&Tensor, &Tensor, c_int) -> NcclResult,
    ) -> Result<(), DistError> {
        let (s, kind) = self.flat(send, op)?;
        let (r, _) = self.flat(recv, op)?;
        self.enqueue(op, call(&s, &r, kind))?;
        self.wait(op)
    }

    /// Enqueue `call(ptr, elements, nccl dtype)` for every bucket of `t` (in place), then wait
    /// for the stream under the watchdog.
    fn in_place_buckets(
        &self,
        t: &Tensor,
        op: &'static str,
        call: impl Fn(*mut c_void, usize, c_int) -> NcclResult,
    ) -> Result<(), DistError> {
        let (flat, kind) = self.flat(t, op)?;
        let elt = flat.kind().elt_size_in_bytes();
        let base = flat.data_ptr() as *mut u8;
        for (off, len) in buckets(flat.numel(), elt, self.bucket_mb) {
            // SAFETY: [off, off + len) lies inside the contiguous device buffer of `flat`,
            // which stays alive (borrowed from the caller) until `wait` returns.
            let p = unsafe { base.add(off * elt) } as *mut c_void;
            self.enqueue(op, call(p, len, kind))?;
        }
        self.wait(op)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.in_place_buckets(t, "all_reduce", |p, len, kind| {
            // SAFETY: in-place all-reduce on one bucket of the buffer, stream 0 (module docs).
            unsafe {
                (self.lib.all_reduce)(
                    p,
                    p,
                    len,
                    kind,
                    ncclRedOp_t::ncclSum as c_int,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    fn reduce_scatter_sum(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError> {
        const OP: &str = "reduce_scatter";
        super::check_chunks(OP, self.rank, self.size, send, recv)?;
        self.out_of_place(OP, send, recv, |s, r, kind| {
            // SAFETY: `send` holds size × n elements, `recv` n (checked above), stream 0.
            unsafe {
                (self.lib.reduce_scatter)(
                    s.data_ptr() as *const c_void,
                    r.data_ptr(),
                    r.numel(),
                    kind,
                    ncclRedOp_t::ncclSum as c_int,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    fn all_gather(&self, send: &Tensor, recv: &mut Tensor) -> Result<(), DistError> {
        const OP: &str = "all_gather";
        super::check_chunks(OP, self.rank, self.size, recv, send)?;
        self.out_of_place(OP, send, recv, |s, r, kind| {
            // SAFETY: `send` holds n elements, `recv` size × n (checked above), stream 0.
            unsafe {
                (self.lib.all_gather)(
                    s.data_ptr() as *const c_void,
                    r.data_ptr(),
                    s.numel(),
                    kind,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        self.in_place_buckets(t, "broadcast", |p, len, kind| {
            // SAFETY: in-place broadcast on one bucket of the buffer, stream 0.
            unsafe {
                (self.lib.broadcast)(
                    p,
                    p,
                    len,
                    kind,
                    root as c_int,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    fn barrier(&self) -> Result<(), DistError> {
        let mut one = Tensor::ones([1], (Kind::Float, self.device));
        self.all_reduce_sum(&mut one)
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<(), DistError> {
        if values.is_empty() {
            return Ok(());
        }
        let mut t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(&mut t)?;
        let host = Vec::<f64>::try_from(t.to_device(Device::Cpu))
            .map_err(|e| self.error("all_reduce (host)", e.to_string()))?;
        values.copy_from_slice(&host);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DistError> {
        if self.life.was_aborted() {
            // Aborted after a failure that was already reported: nothing to destroy, and MPI
            // is left to Drop (peers may be gone).
            return Ok(());
        }
        let destroyed = {
            let _armed = self.watchdog.arm("communicator destroy");
            // SAFETY: the handle is live (first end of its lifetime) and not used after this.
            self.life.end(Lifetime::DESTROYED, || unsafe {
                (self.lib.comm_destroy)(self.comm)
            })
        };
        let Some(r) = destroyed else {
            return Ok(()); // finished before
        };
        self.lib
            .check(r)
            .map_err(|e| self.error("communicator destroy", e))?;
        if let Some(u) = self.mpi.take() {
            let _armed = self.watchdog.arm("MPI finalize");
            drop(u);
        }
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // An error path unless `finish` ran: abort (no collective shutdown with peers that may
        // be gone) — unless an earlier failure aborted it already or `finish` destroyed it.
        self.abort();
        if let Some(u) = self.mpi.take() {
            std::mem::forget(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_communicator_is_freed_once_and_never_touched_after() {
        use std::cell::Cell;
        let calls = Cell::new(0);
        let free = || calls.set(calls.get() + 1);
        // A timeout aborts; the Drop that follows must not abort the freed handle again.
        let life = Lifetime::default();
        assert!(life.is_live());
        assert!(life.end(Lifetime::ABORTED, free).is_some());
        assert!(!life.is_live() && life.was_aborted());
        assert!(life.end(Lifetime::ABORTED, free).is_none(), "second abort");
        assert!(
            life.end(Lifetime::DESTROYED, free).is_none(),
            "destroy after abort"
        );
        assert_eq!(calls.get(), 1);
        // finish destroys; Drop's abort is then a no-op.
        let life = Lifetime::default();
        assert!(life.end(Lifetime::DESTROYED, free).is_some());
        assert!(
            life.end(Lifetime::ABORTED, free).is_none(),
            "abort after destroy"
        );
        assert!(!life.was_aborted());
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn unique_id_bytes_round_trip() {
        let bytes: Vec<u8> = (0..UNIQUE_ID_BYTES).map(|i| (i * 7 + 3) as u8).collect();
        let id = id_from_bytes(&bytes).unwrap();
        assert_eq!(id_to_bytes(&id), bytes);
        let e = id_from_bytes(&bytes[..100]).unwrap_err().to_string();
        assert!(e.contains("got 100 bytes, expected 128"), "{e}");
    }

    #[test]
    fn a_missing_library_is_one_line_naming_what_was_tried_and_the_fix() {
        let e = NcclLib::open(&["/nonexistent/libnccl.so.2", "libnccl-not-here.so"])
            .err()
            .expect("no such library");
        assert!(
            e.starts_with("NCCL library not found: tried /nonexistent/libnccl.so.2"),
            "{e}"
        );
        assert!(e.contains("libnccl-not-here.so"), "{e}");
        assert!(
            e.contains("LD_LIBRARY_PATH") && e.contains(LIBRARY_ENV),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_library_without_nccl_symbols_is_named() {
        let e = NcclLib::open(&["libm.so.6"])
            .err()
            .expect("libm is not NCCL");
        assert!(e.contains("libm.so.6 has no ncclGetVersion"), "{e}");
    }

    /// Runs where libtorch_cuda brought NCCL along (a CUDA build of torch): version and
    /// unique id need no GPU.
    #[test]
    fn nccl_reports_its_version_and_makes_unique_ids_when_present() {
        let Ok(lib) = NcclLib::open(LIBRARY_NAMES) else {
            eprintln!("note: no NCCL library here; skipping");
            return;
        };
        let (major, minor, _) = lib.version().unwrap();
        assert_eq!(major, 2, "NCCL 2.x, got {major}.{minor}");
        println!("{}: NCCL {major}.{minor}", lib.name);
        match (lib.unique_id(), lib.unique_id()) {
            (Ok(a), Ok(b)) => assert_ne!(id_to_bytes(&a), id_to_bytes(&b)),
            (Err(e), _) | (_, Err(e)) => eprintln!("note: ncclGetUniqueId without a GPU: {e}"),
        }
    }

    #[test]
    fn the_id_takes_tcp_when_master_addr_is_set_else_mpi_under_mpirun_and_srun_with_pmi() {
        let mut r = RankInfo::single();
        let none = |_: &str| None;
        let pmix = |k: &str| (k == "PMIX_RANK").then(|| "3".to_string());
        let master = |k: &str| match k {
            "MASTER_ADDR" => Some("node1".to_string()),
            "MASTER_PORT" => Some("29500".to_string()),
            "PMIX_RANK" => Some("3".to_string()),
            _ => None,
        };
        let tcp = Some(IdCarrier::Tcp {
            addr: "node1".into(),
            port: "29500".into(),
        });
        for (source, plain, with_pmix) in [
            ("OpenMPI", true, true),
            ("PMI", true, true),
            ("Slurm", false, true),
            ("torchrun", false, false),
        ] {
            r.source = source;
            let mpi = |yes: bool| yes.then_some(IdCarrier::Mpi);
            assert_eq!(id_carrier(&r, none), mpi(plain), "{source}");
            assert_eq!(id_carrier(&r, pmix), mpi(with_pmix), "{source} with PMIx");
            // srun with MASTER_ADDR/PORT exported (the sbatch example): TCP, which cannot
            // fail on a PMIx mismatch, even where MPI could carry it.
            assert_eq!(id_carrier(&r, master), tcp, "{source} with MASTER_ADDR");
        }
    }

    #[test]
    fn gradient_dtypes_map_to_nccl_types() {
        assert_eq!(nccl_kind(Kind::Float), Some(7));
        assert_eq!(nccl_kind(Kind::BFloat16), Some(9));
        assert_eq!(nccl_kind(Kind::Bool), None);
    }
}
