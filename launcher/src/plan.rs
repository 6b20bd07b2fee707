//! The launch plan: validated flags turned into the exact processes to start — each rank's argv
//! and environment (torchrun's contract), or one `mpirun` for CPU ranks. Pure data, no processes:
//! everything here is unit-tested. Not here: spawning and supervision (`supervise.rs`).

use crate::cli::{Device, LaunchArgs};
use crate::device::Selection;
use crate::BadInput;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// torchrun's default rendezvous port, used when several nodes must agree on one.
pub const DEFAULT_MULTI_NODE_PORT: u16 = 29500;

/// Variables that describe *some other* rank's identity (the launcher's own slot when it was
/// itself started by mpirun/srun-with-PMI); never inherited by ranks the launcher numbers itself.
const FOREIGN_RANK_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "OMPI_COMM_WORLD_NODE_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
];

/// torchrun variables that must not leak into mpirun ranks (they read OMPI_COMM_WORLD_*).
const TORCHRUN_VARS: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// The launcher starts every rank itself and sets the torchrun variables.
    Direct,
    /// `mpirun -np nproc` starts the ranks (CPU ranks, MPI backend); mpirun sets OMPI_COMM_WORLD_*.
    /// Each rank runs under `shim --mpi-rank-shim` (this launcher), which reports how it ended.
    Mpirun { mpirun: PathBuf, shim: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub mla: PathBuf,
    pub device: Device,
    pub launch: Launch,
    pub nproc: u32,
    pub nnodes: u32,
    pub node_rank: u32,
    pub master_addr: String,
    /// None: pick a free local port for every attempt (single node only).
    pub master_port: Option<u16>,
    /// `--config F` plus the pass-through arguments, in order, as the ranks get them after `train`.
    pub config: PathBuf,
    pub passthrough: Vec<OsString>,
    pub prefix_rank0: bool,
    pub max_restarts: u32,
    pub grace: Duration,
    pub stop_timeout: Duration,
    /// Set OMP_NUM_THREADS to this for every rank (None: the user set it, or one rank).
    pub omp_threads: Option<usize>,
    /// `MLA_RUN_ID` of every rank, the same across restarts: a restarted rank 0 takes the
    /// out_dir's lease of its crashed predecessor over at once instead of waiting for it to go
    /// stale (the user's own MLA_RUN_ID when set).
    pub run_id: String,
}

/// The environment variable that names a run across processes and restarts.
pub const RUN_ID_VAR: &str = "MLA_RUN_ID";

/// A run id for this launcher: the user's `MLA_RUN_ID`, else `launch-<host>-<pid>-<unix time>`.
fn run_id() -> String {
    if let Some(id) = std::env::var(RUN_ID_VAR)
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        return id;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("launch-{host}-{}-{secs}", std::process::id())
}

/// One process to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSpec {
    /// The rank this process is (None for mpirun, which runs all of them).
    pub rank: Option<u32>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env_set: Vec<(String, String)>,
    pub env_remove: Vec<String>,
}

impl Plan {
    /// Validate flags against the device selection and the environment (`mla`, `mpirun`,
    /// the config file). `which` finds a program on PATH; `cores` is this machine's CPU count;
    /// `launcher` is this executable (the rank shim under mpirun).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        args: &LaunchArgs,
        sel: Selection,
        passthrough: Vec<OsString>,
        mla: PathBuf,
        launcher: PathBuf,
        which: impl Fn(&str) -> Option<PathBuf>,
        omp_env_set: bool,
        cores: usize,
    ) -> Result<Plan, BadInput> {
        let nnodes = args.nnodes.unwrap_or(1);
        if args.node_rank >= nnodes {
            return Err(BadInput(format!(
                "--node-rank {} must be below --nnodes {nnodes}",
                args.node_rank
            )));
        }
        if nnodes > 1 && args.master_addr.is_none() {
            return Err(BadInput(format!(
                "--nnodes {nnodes} needs --master-addr (the address of node 0, reachable from every node)"
            )));
        }
        if !args.config.is_file() {
            return Err(BadInput(format!(
                "--config {}: no such file",
                args.config.display()
            )));
        }
        let launch = if sel.device == Device::Cpu && sel.nproc > 1 {
            if nnodes > 1 {
                return Err(BadInput(
                    "multi-node CPU runs are not started by mla-launch: start `mla train --device cpu` \
                     on all nodes with mpirun or srun (see launcher/README.md)"
                        .into(),
                ));
            }
            let mpirun = which("mpirun").ok_or_else(|| {
                BadInput(format!(
                    "--device cpu --nproc {} runs the ranks under mpirun, which is not on PATH; \
                     install OpenMPI (apt-get install openmpi-bin) or use --nproc 1",
                    sel.nproc
                ))
            })?;
            Launch::Mpirun {
                mpirun,
                shim: launcher,
            }
        } else {
            Launch::Direct
        };
        let master_port = match (args.master_port, nnodes) {
            (Some(p), _) => Some(p),
            (None, 1) => None,
            (None, _) => Some(DEFAULT_MULTI_NODE_PORT),
        };
        // Like torchrun: N ranks on a node share its cores instead of each starting one
        // thread per core (N× oversubscription). The user's own setting wins.
        let omp_threads =
            (sel.nproc > 1 && !omp_env_set).then(|| (cores / sel.nproc as usize).max(1));
        Ok(Plan {
            mla,
            device: sel.device,
            launch,
            nproc: sel.nproc,
            nnodes,
            node_rank: args.node_rank,
            master_addr: args
                .master_addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1".to_string()),
            master_port,
            config: args.config.clone(),
            passthrough,
            prefix_rank0: args.prefix_rank0,
            max_restarts: args.max_restarts,
            grace: Duration::from_secs_f64(args.grace_secs),
            stop_timeout: Duration::from_secs_f64(args.stop_timeout_secs),
            omp_threads,
            run_id: run_id(),
        })
    }

    pub fn world_size(&self) -> u32 {
        self.nnodes * self.nproc
    }

    /// The arguments after `<mla>`: `train --device D --config F <passthrough>`, then `--devices
    /// N --num_nodes M` (what was started, so the ranks' config and checkpoints say so), and on
    /// a restart `--resume auto` (replacing any `--resume` the user gave, so the newest
    /// checkpoint wins).
    pub fn rank_args(&self, resume: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "train".into(),
            "--device".into(),
            self.device.as_str().into(),
            "--config".into(),
            self.config.clone().into_os_string(),
        ];
        let started: [OsString; 4] = [
            "--devices".into(),
            self.nproc.to_string().into(),
            "--num_nodes".into(),
            self.nnodes.to_string().into(),
        ];
        if !resume {
            args.extend(self.passthrough.iter().cloned());
            args.extend(started);
            return args;
        }
        let mut it = self.passthrough.iter();
        while let Some(a) = it.next() {
            if a == "--resume" {
                it.next(); // its value
            } else if !a.to_str().is_some_and(|s| s.starts_with("--resume=")) {
                args.push(a.clone());
            }
        }
        args.extend(started);
        args.extend(["--resume".into(), "auto".into()]);
        args
    }

    /// The processes of one attempt. `port` is the rendezvous port for this attempt.
    pub fn procs(&self, resume: bool, port: u16) -> Vec<ProcSpec> {
        let rank_args = self.rank_args(resume);
        let mut common: Vec<(String, String)> = vec![
            ("MASTER_ADDR".into(), self.master_addr.clone()),
            ("MASTER_PORT".into(), port.to_string()),
            (RUN_ID_VAR.into(), self.run_id.clone()),
        ];
        if let Some(t) = self.omp_threads {
            common.push(("OMP_NUM_THREADS".into(), t.to_string()));
        }
        match &self.launch {
            Launch::Direct => (0..self.nproc)
                .map(|local| {
                    let rank = self.node_rank * self.nproc + local;
                    let mut env = vec![
                        ("RANK".to_string(), rank.to_string()),
                        ("LOCAL_RANK".to_string(), local.to_string()),
                        ("WORLD_SIZE".to_string(), self.world_size().to_string()),
                        ("LOCAL_WORLD_SIZE".to_string(), self.nproc.to_string()),
                        ("GROUP_RANK".to_string(), self.node_rank.to_string()),
                    ];
                    env.extend(common.iter().cloned());
                    ProcSpec {
                        rank: Some(rank),
                        program: self.mla.clone(),
                        args: rank_args.clone(),
                        env_set: env,
                        env_remove: FOREIGN_RANK_VARS.iter().map(|s| s.to_string()).collect(),
                    }
                })
                .collect(),
            Launch::Mpirun { mpirun, shim } => {
                let np = self.nproc.to_string();
                let mut args: Vec<OsString> = vec![
                    "-np".into(),
                    np.clone().into(),
                    // Keep every rank on this node even inside a multi-node allocation.
                    "--host".into(),
                    format!("localhost:{np}").into(),
                    "--oversubscribe".into(),
                    // Containers run as root; OpenMPI refuses that without this flag.
                    "--allow-run-as-root".into(),
                    // Default core binding would pin each rank (and libtorch's threads) to one core.
                    "--bind-to".into(),
                    "none".into(),
                    // `[job,rank]<stdout>:` prefixes, turned into `[rank K] ` by the launcher.
                    "--tag-output".into(),
                ];
                // Local ranks inherit mpirun's environment; `-x` also forwards these to any
                // remote daemon, and documents what the launcher adds.
                for (k, _) in &common {
                    args.extend(["-x".into(), k.into()]);
                }
                args.extend([
                    shim.clone().into_os_string(),
                    crate::shim::FLAG.into(),
                    self.mla.clone().into_os_string(),
                    "--".into(),
                ]);
                args.extend(rank_args);
                let mut env_remove: Vec<String> =
                    TORCHRUN_VARS.iter().map(|s| s.to_string()).collect();
                env_remove.extend(FOREIGN_RANK_VARS.iter().map(|s| s.to_string()));
                vec![ProcSpec {
                    rank: None,
                    program: mpirun.clone(),
                    args,
                    env_set: common,
                    env_remove,
                }]
            }
        }
    }
}

/// `--mla PATH`, else `mla` next to the running executable, else `mla` on PATH.
pub fn resolve_mla(
    flag: Option<&Path>,
    exe_dir: Option<&Path>,
    which: impl Fn(&str) -> Option<PathBuf>,
) -> Result<PathBuf, BadInput> {
    if let Some(p) = flag {
        if !is_executable(p) {
            return Err(BadInput(format!(
                "--mla {}: not an executable file",
                p.display()
            )));
        }
        // Absolute, so mpirun and ranks find it whatever their working directory.
        return Ok(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    }
    if let Some(sibling) = exe_dir.map(|d| d.join("mla")).filter(|p| is_executable(p)) {
        return Ok(sibling);
    }
    which("mla").ok_or_else(|| {
        BadInput(format!(
            "cannot find the `mla` binary: not next to mla-launch{} and not on PATH; \
             build it (cargo build --release -p mla-trainer) or pass --mla PATH",
            exe_dir
                .map(|d| format!(" (in {})", d.display()))
                .unwrap_or_default()
        ))
    })
}

/// `name` on PATH, as the shell would find it.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A free TCP port on this host for a single-node rendezvous (so two jobs on one machine do not
/// collide on 29500). Racy by nature; rank 0 binds it a moment later.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// Render a command line for logs.
pub fn display_cmd(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a: &OsStr| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(char::is_whitespace) {
                format!("{s:?}")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(v: &[&str]) -> LaunchArgs {
        LaunchArgs::try_parse_from(std::iter::once("mla-launch").chain(v.iter().copied())).unwrap()
    }

    fn config() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    fn sel(device: Device, nproc: u32) -> Selection {
        Selection {
            device,
            nproc,
            defaulted: false,
        }
    }

    fn plan(a: &LaunchArgs, s: Selection, pass: &[&str], mpirun: bool) -> Result<Plan, BadInput> {
        let which = |n: &str| (mpirun && n == "mpirun").then(|| PathBuf::from("/usr/bin/mpirun"));
        Plan::new(
            a,
            s,
            pass.iter().map(OsString::from).collect(),
            PathBuf::from("/opt/mla"),
            PathBuf::from("/opt/mla-launch"),
            which,
            false,
            16,
        )
    }

    fn env<'a>(p: &'a ProcSpec, k: &str) -> &'a str {
        &p.env_set.iter().find(|(n, _)| n == k).unwrap().1
    }

    #[test]
    fn torchrun_env_for_each_rank_on_one_node() {
        let c = config();
        let a = args(&["--config", c.path().to_str().unwrap()]);
        let p = plan(&a, sel(Device::Cuda, 4), &[], false).unwrap();
        let procs = p.procs(false, 1234);
        assert_eq!(procs.len(), 4);
        for (i, pr) in procs.iter().enumerate() {
            assert_eq!(pr.rank, Some(i as u32));
            assert_eq!(env(pr, "RANK"), i.to_string());
            assert_eq!(env(pr, "LOCAL_RANK"), i.to_string());
            assert_eq!(env(pr, "WORLD_SIZE"), "4");
            assert_eq!(env(pr, "LOCAL_WORLD_SIZE"), "4");
            assert_eq!(env(pr, "MASTER_ADDR"), "127.0.0.1");
            assert_eq!(env(pr, "MASTER_PORT"), "1234");
            assert_eq!(env(pr, "OMP_NUM_THREADS"), "4");
            assert_eq!(env(pr, RUN_ID_VAR), p.run_id, "one run id for every rank");
            assert!(pr.env_remove.contains(&"OMPI_COMM_WORLD_RANK".to_string()));
        }
        assert_eq!(
            p.master_port, None,
            "single node picks a free port per attempt"
        );
    }

    #[test]
    fn multi_node_rank_arithmetic() {
        let c = config();
        let a = args(&[
            "--config",
            c.path().to_str().unwrap(),
            "--nnodes",
            "3",
            "--node-rank",
            "2",
            "--master-addr",
            "node0",
        ]);
        let p = plan(&a, sel(Device::Cuda, 8), &[], false).unwrap();
        assert_eq!(p.master_port, Some(DEFAULT_MULTI_NODE_PORT));
        let procs = p.procs(false, 29500);
        assert_eq!(procs[3].rank, Some(19));
        assert_eq!(env(&procs[3], "RANK"), "19");
        assert_eq!(env(&procs[3], "LOCAL_RANK"), "3");
        assert_eq!(env(&procs[3], "WORLD_SIZE"), "24");
        assert_eq!(env(&procs[3], "GROUP_RANK"), "2");
        assert_eq!(env(&procs[3], "MASTER_ADDR"), "node0");
    }

    #[test]
    fn multi_node_flags_are_checked() {
        let c = config();
        let f = c.path().to_str().unwrap();
        let e = plan(
            &args(&["--config", f, "--nnodes", "2"]),
            sel(Device::Cuda, 1),
            &[],
            false,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("--master-addr"), "{e}");
        let e = plan(
            &args(&["--config", f, "--nnodes", "2", "--node-rank", "2"]),
            sel(Device::Cuda, 1),
            &[],
            false,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("--node-rank 2 must be below --nnodes 2"), "{e}");
    }

    #[test]
    fn rank_args_pass_through_verbatim_and_restart_appends_resume_auto() {
        let c = config();
        let f = c.path().to_str().unwrap();
        let a = args(&["--config", f]);
        let p = plan(
            &a,
            sel(Device::Cpu, 1),
            &[
                "--train.max_steps",
                "20",
                "--resume",
                "out/step-1",
                "--resume=x",
                "--out_dir",
                "o",
            ],
            false,
        )
        .unwrap();
        let first: Vec<_> = p.rank_args(false);
        assert_eq!(
            first,
            [
                "train",
                "--device",
                "cpu",
                "--config",
                f,
                "--train.max_steps",
                "20",
                "--resume",
                "out/step-1",
                "--resume=x",
                "--out_dir",
                "o",
                "--devices",
                "1",
                "--num_nodes",
                "1"
            ]
            .map(OsString::from)
        );
        assert_eq!(
            p.rank_args(true),
            [
                "train",
                "--device",
                "cpu",
                "--config",
                f,
                "--train.max_steps",
                "20",
                "--out_dir",
                "o",
                "--devices",
                "1",
                "--num_nodes",
                "1",
                "--resume",
                "auto"
            ]
            .map(OsString::from)
        );
    }

    #[test]
    fn cpu_ranks_run_under_mpirun_with_one_process() {
        let c = config();
        let f = c.path().to_str().unwrap();
        let p = plan(
            &args(&["--config", f]),
            sel(Device::Cpu, 2),
            &["--x", "1"],
            true,
        )
        .unwrap();
        assert!(matches!(p.launch, Launch::Mpirun { .. }));
        let procs = p.procs(false, 4000);
        assert_eq!(procs.len(), 1);
        let cmd = display_cmd(&procs[0].program, &procs[0].args);
        assert!(
            cmd.starts_with(
                "/usr/bin/mpirun -np 2 --host localhost:2 --oversubscribe --allow-run-as-root"
            ),
            "{cmd}"
        );
        assert!(cmd.contains("--tag-output"), "{cmd}");
        assert!(cmd.contains("-x MASTER_PORT"), "{cmd}");
        assert!(
            cmd.ends_with(&format!(
                " /opt/mla-launch --mpi-rank-shim /opt/mla -- train --device cpu --config {f} --x 1 \
                 --devices 2 --num_nodes 1"
            )),
            "{cmd}"
        );
        assert!(procs[0].env_remove.contains(&"RANK".to_string()));
        assert_eq!(env(&procs[0], "OMP_NUM_THREADS"), "8");
    }

    #[test]
    fn cpu_ranks_without_mpirun_is_a_clear_error() {
        let c = config();
        let f = c.path().to_str().unwrap();
        let e = plan(&args(&["--config", f]), sel(Device::Cpu, 2), &[], false)
            .unwrap_err()
            .0;
        assert!(e.contains("mpirun"), "{e}");
        // One CPU rank needs no mpirun.
        let p = plan(&args(&["--config", f]), sel(Device::Cpu, 1), &[], false).unwrap();
        assert_eq!(p.launch, Launch::Direct);
        assert_eq!(p.omp_threads, None);
    }

    #[test]
    fn missing_config_is_bad_input() {
        let e = plan(
            &args(&["--config", "/nonexistent/cfg.yaml"]),
            sel(Device::Cpu, 1),
            &[],
            false,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("/nonexistent/cfg.yaml"), "{e}");
    }

    #[test]
    fn mla_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let none = |_: &str| None;
        let e = resolve_mla(None, Some(dir.path()), none).unwrap_err().0;
        assert!(e.contains("cannot find the `mla` binary"), "{e}");
        let on_path = |_: &str| Some(PathBuf::from("/usr/local/bin/mla"));
        assert_eq!(
            resolve_mla(None, Some(dir.path()), on_path).unwrap(),
            PathBuf::from("/usr/local/bin/mla")
        );
        let sib = dir.path().join("mla");
        std::fs::write(&sib, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sib, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve_mla(None, Some(dir.path()), on_path).unwrap(), sib);
        let e = resolve_mla(Some(Path::new("/nonexistent/mla")), None, on_path)
            .unwrap_err()
            .0;
        assert!(e.contains("--mla /nonexistent/mla"), "{e}");
    }
}
