//! `dfs up`: a whole cluster on this machine, in the foreground. Starts the metaserver, the
//! storage daemons and a mount as separate processes, each logging to `DIR/logs/`, and stops
//! them in order (mount first, so it can flush) on Ctrl-C or SIGTERM.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dfs_common::Config;
use dfs_common::process::{is_dfs_mounted, mounted_fs_type, unmount};

use crate::local;
use crate::status;

const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error("cannot start {name} ({binary}): {source}")]
    Spawn {
        name: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited during start-up ({status}); its log is {log}")]
    Died {
        name: String,
        status: ExitStatus,
        log: PathBuf,
    },
    #[error("{what} not ready within {timeout:?}; see the logs in {logs}")]
    NotReady {
        what: String,
        timeout: Duration,
        logs: PathBuf,
    },
    #[error("{mountpoint} already has a {fs_type} file system mounted on it")]
    AlreadyMounted { mountpoint: PathBuf, fs_type: String },
    #[error("cannot use mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct UpOptions {
    pub mountpoint: PathBuf,
    pub dir: PathBuf,
    pub storage_daemons: Option<usize>,
    /// Default replication factor of the cluster.
    pub replicas: Option<u8>,
}

struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Finds a sibling binary next to the running `dfs`, else on PATH.
pub fn binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn spawn(name: &str, bin: &str, args: &[&std::ffi::OsStr], logs: &Path) -> Result<Process, UpError> {
    let log = logs.join(format!("{name}.log"));
    let binary = binary(bin);
    let spawn_err = |source| UpError::Spawn {
        name: name.to_owned(),
        binary: binary.clone(),
        source,
    };
    let out = File::options()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    let mut cmd = Command::new(&binary);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Own process group: Ctrl-C reaches `dfs up` alone, which stops children in order.
            libc::setpgid(0, 0);
            // If `dfs up` itself dies, its children stop too.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(spawn_err)?;
    Ok(Process {
        name: name.to_owned(),
        child,
        log,
    })
}

impl Process {
    fn check_alive(&mut self) -> Result<(), UpError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(UpError::Died {
                name: self.name.clone(),
                status,
                log: self.log.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    async fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until<F>(what: &str, logs: &Path, procs: &mut [&mut Process], mut ready: F) -> Result<(), UpError>
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready().await {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            return Err(UpError::NotReady {
                what: what.to_owned(),
                timeout: START_TIMEOUT,
                logs: logs.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn prepare_mountpoint(mountpoint: &Path) -> Result<PathBuf, UpError> {
    std::fs::create_dir_all(mountpoint).or_else(|e| {
        // A dead FUSE mount answers ENOTCONN: detach it and carry on.
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            unmount(mountpoint, true).map_err(|source| UpError::MountPoint {
                path: mountpoint.to_owned(),
                source,
            })
        } else {
            Err(UpError::MountPoint {
                path: mountpoint.to_owned(),
                source: e,
            })
        }
    })?;
    let path = mountpoint.canonicalize().map_err(|source| UpError::MountPoint {
        path: mountpoint.to_owned(),
        source,
    })?;
    if let Some(fs_type) = mounted_fs_type(&path) {
        return Err(UpError::AlreadyMounted {
            mountpoint: path,
            fs_type,
        });
    }
    Ok(path)
}

/// Runs the cluster until SIGINT/SIGTERM or until the mount goes away.
pub async fn run(opts: UpOptions) -> Result<(), UpError> {
    // Caught from the start: Ctrl-C while starting stops what has started, cleanly.
    let mut signals = dfs_common::process::ShutdownSignals::install().map_err(|source| UpError::Spawn {
        name: "signal handler".into(),
        binary: PathBuf::from("dfs"),
        source,
    })?;
    let wanted = opts
        .storage_daemons
        .unwrap_or(3)
        .max(opts.replicas.unwrap_or(1) as usize);
    let config = local::prepare(&opts.dir, wanted, "127.0.0.1", opts.replicas)?;
    if let Some(n) = opts.storage_daemons
        && config.storaged.len() > n
    {
        eprintln!(
            "note: {} already has {} storage daemons; starting all of them",
            opts.dir.display(),
            config.storaged.len()
        );
    }
    let mountpoint = prepare_mountpoint(&opts.mountpoint)?;
    let logs = opts.dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|source| local::LocalError::Io {
        path: logs.clone(),
        source,
    })?;
    let config_path = config.path.clone();
    let cfg = config_path.as_os_str();

    let mount_metrics = local::free_addr("127.0.0.1").map_err(|source| local::LocalError::Io {
        path: opts.dir.clone(),
        source,
    })?;
    let mut meta = spawn("metaserver", "dfs-metaserver", &["--config".as_ref(), cfg], &logs)?;
    let mut daemons = Vec::new();
    let mut mount_slot: Option<Process> = None;
    let starting = async {
        wait_until("metaserver", &logs, &mut [&mut meta], async || {
            status::fetch(&config, Duration::from_millis(500)).await.is_ok()
        })
        .await?;
        for s in &config.storaged {
            daemons.push(spawn(
                &s.name,
                "dfs-storaged",
                &["--config".as_ref(), cfg, "--name".as_ref(), s.name.as_ref()],
                &logs,
            )?);
        }
        let names: Vec<String> = config.storaged.iter().map(|s| s.name.clone()).collect();
        let mut procs: Vec<&mut Process> = daemons.iter_mut().collect();
        wait_until("storage daemons", &logs, &mut procs, async || {
            all_up(&config, &names).await
        })
        .await?;
        let mount = mount_slot.insert(spawn(
            "mount",
            "dfs-mount",
            &[
                "--config".as_ref(),
                cfg,
                "--foreground".as_ref(),
                "--metrics-listen".as_ref(),
                mount_metrics.as_ref(),
                mountpoint.as_os_str(),
            ],
            &logs,
        )?);
        wait_until("mount", &logs, &mut [mount], async || is_dfs_mounted(&mountpoint)).await
    };
    let started = tokio::select! {
        r = starting => Some(r),
        _ = signals.recv() => None,
    };
    match started {
        Some(Ok(())) => {}
        outcome => {
            if outcome.is_none() {
                println!("interrupted while starting; stopping");
            }
            if let Some(mut m) = mount_slot.take() {
                m.stop(Duration::from_secs(10)).await;
            }
            if is_dfs_mounted(&mountpoint) {
                let _ = unmount(&mountpoint, true);
            }
            stop_all(&mut daemons, &mut meta).await;
            return outcome.unwrap_or(Ok(()));
        }
    }
    let mut mount = mount_slot.take().expect("mount started");
    println!(
        "dfs is up: metaserver at {} with {} storage daemons",
        config.cluster.metaserver,
        config.storaged.len()
    );
    println!("  mounted at  {}", mountpoint.display());
    println!("  config      {}", config_path.display());
    println!("  logs        {}", logs.display());
    println!("  status      dfs status --config {}", config_path.display());
    let mut metrics = vec![format!("mount http://{mount_metrics}/metrics")];
    if let Some(addr) = config.metaserver.as_ref().and_then(|m| m.metrics_listen.as_ref()) {
        metrics.push(format!("metaserver http://{addr}/metrics"));
    }
    for s in &config.storaged {
        if let Some(addr) = &s.metrics_listen {
            metrics.push(format!("{} http://{addr}/metrics", s.name));
        }
    }
    println!("  metrics     {}", metrics.join("\n              "));
    println!("              (dfs metrics URL prints each operation's latency)");
    println!("Press Ctrl-C to unmount and stop.");

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = signals.recv() => break,
            _ = tick.tick() => {
                if let Ok(Some(status)) = mount.child.try_wait() {
                    eprintln!("the mount exited ({status}); stopping the cluster");
                    break;
                }
                for d in daemons.iter_mut() {
                    if let Ok(Some(status)) = d.child.try_wait() {
                        eprintln!("storage daemon {} exited ({status}); see {}", d.name, d.log.display());
                    }
                }
            }
        }
    }
    println!("unmounting {} and stopping the cluster", mountpoint.display());
    mount.stop(Duration::from_secs(20)).await;
    if is_dfs_mounted(&mountpoint) {
        let _ = unmount(&mountpoint, true);
    }
    stop_all(&mut daemons, &mut meta).await;
    Ok(())
}

async fn all_up(config: &Config, names: &[String]) -> bool {
    match status::fetch(config, Duration::from_millis(500)).await {
        // Heard from since the metaserver started, not merely presumed up.
        Ok(report) => names.iter().all(|n| {
            report
                .nodes
                .iter()
                .any(|r| &r.node.name == n && r.node.up && r.last_seen_ms.is_some())
        }),
        Err(_) => false,
    }
}

async fn stop_all(daemons: &mut [Process], meta: &mut Process) {
    for d in daemons.iter_mut() {
        d.stop(Duration::from_secs(10)).await;
    }
    meta.stop(Duration::from_secs(10)).await;
}
