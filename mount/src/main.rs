use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use dfs_common::config::{Config, DEFAULT_PATH};
use dfs_mount::fuse::DfsFs;
use dfs_mount::meta_client::MetaClient;
use dfs_mount::ops::{Mount, Timeouts};
use dfs_mount::storage_pool::StoragePool;
use dfs_proto::Peer;
use dfs_proto::tls::TlsIdentity;
use fuser::{MountOption, SessionACL};

/// Mount a dfs cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory to mount the file system on.
    mountpoint: PathBuf,
    /// Cluster configuration file (its [client] section names this mount's certificate).
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Stay in the foreground instead of detaching once mounted.
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Where a detached mount writes its log (default /var/log/dfs-mount.log, else /tmp).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address (`host:port`, path `/metrics`);
    /// overrides `metrics_listen` of the config's [client] section.
    #[arg(long)]
    metrics_listen: Option<String>,
}

/// How start-up reports success or failure: directly, or to the parent that is waiting for the
/// detached child.
enum Ready {
    Foreground,
    Detached(Option<std::fs::File>),
}

impl Ready {
    fn report(&mut self, message: &str) {
        if let Ready::Detached(pipe) = self
            && let Some(mut p) = pipe.take()
        {
            let _ = p.write_all(message.as_bytes());
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    let client = config.client()?.clone();
    let tls = TlsIdentity::load(&config.tls_files(&client.cert, &client.key))?;
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {} is not usable", args.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    let mut ready = if args.foreground {
        Ready::Foreground
    } else {
        let log = args.log_file.clone().unwrap_or_else(default_log_file);
        detach(&log)?
    };
    dfs_common::logging::init("dfs-mount");
    let metrics_listen = args.metrics_listen.clone().or_else(|| client.metrics_listen.clone());
    let result = serve(&config, &tls, &mountpoint, metrics_listen.as_deref(), &mut ready);
    if let Err(e) = &result {
        tracing::error!("{e:#}");
        ready.report(&format!("{e:#}\n"));
    }
    result
}

fn default_log_file() -> PathBuf {
    let var_log = PathBuf::from("/var/log/dfs-mount.log");
    if std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&var_log)
        .is_ok()
    {
        var_log
    } else {
        std::env::temp_dir().join("dfs-mount.log")
    }
}

/// Forks: the parent waits for the child to report the mount ready (or why it failed) and exits;
/// the child continues detached, logging to `log`. Runs before any thread exists.
fn detach(log: &Path) -> anyhow::Result<Ready> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fds were just created and are owned here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads exist yet, so the child may continue normally.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls on fds we own.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&log_file), 2);
            }
            Ok(Ready::Detached(Some(std::fs::File::from(write_end))))
        }
        _child => {
            drop(write_end);
            let mut message = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut message);
            if message.trim() == "ok" {
                std::process::exit(0);
            }
            if message.is_empty() {
                message = format!("the mount process exited before mounting; see {}\n", log.display());
            }
            eprint!("dfs-mount: {message}");
            std::process::exit(1);
        }
    }
}

fn serve(
    config: &Config,
    tls: &TlsIdentity,
    mountpoint: &Path,
    metrics_listen: Option<&str>,
    ready: &mut Ready,
) -> anyhow::Result<()> {
    let client = config.client()?;
    // With one thread, the main thread runs every task: it does so from its last `block_on`
    // below, entered right after mounting. FUSE requests arriving before then wait for it.
    let runtime = match client.worker_threads {
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name("dfs-mount")
            .enable_all()
            .build()?,
    };
    // Caught before mounting, so a stop request can never leave a dead mount behind.
    let mut signals = {
        let _rt = runtime.enter();
        dfs_common::process::ShutdownSignals::install()?
    };
    let timeouts = Timeouts {
        request: client.request_timeout(),
        data: client.data_timeout(),
        connect: client.connect_timeout(),
    };
    let client_name = format!("{}:{} (pid {})", hostname(), mountpoint.display(), std::process::id());
    let (mount, keepalive) = runtime.block_on(async {
        let endpoint = dfs_proto::endpoint::client(tls.client_config()?)?;
        let peer = Peer::new(
            endpoint.clone(),
            config.cluster.metaserver.clone(),
            config.cluster.metaserver_name.clone(),
            timeouts.connect,
        );
        let meta = Arc::new(MetaClient::new(peer, timeouts.request, client_name));
        let session = meta
            .open_session()
            .await
            .with_context(|| format!("cannot reach the metaserver at {}", config.cluster.metaserver))?;
        let storage = StoragePool::new(endpoint, timeouts.connect);
        let attr_ttl = Duration::from_millis(client.attr_timeout_ms);
        let entry_ttl = Duration::from_millis(client.entry_timeout_ms);
        let mount = Arc::new(Mount::new(
            meta,
            storage,
            session.chunk_size,
            timeouts,
            attr_ttl,
            entry_ttl,
        ));
        anyhow::Ok((mount, Duration::from_millis(session.keepalive_ms as u64)))
    })?;
    let requests = dfs_common::metrics::RequestMetrics::default();
    let metrics = dfs_common::metrics::Metrics::new("dfs_mount");
    requests.register(&metrics, "fuse_request", "FUSE requests");
    runtime.block_on(dfs_common::metrics::serve_if_configured(metrics_listen, &metrics))?;

    let fs = DfsFs::new(
        mount.clone(),
        runtime.handle().clone(),
        Duration::from_millis(client.attr_timeout_ms),
        Duration::from_millis(client.entry_timeout_ms),
        requests,
    );
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName("dfs".into()),
        MountOption::Subtype("dfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    // SAFETY: geteuid has no preconditions.
    options.acl = if unsafe { libc::geteuid() } == 0 {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    options.n_threads = Some(1);
    let mut session = fuser::Session::new(fs, mountpoint, &options)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    mount.set_notifier(session.notifier());
    let mut unmounter = session.unmount_callable();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let fuse_thread = std::thread::Builder::new().name("fuse".into()).spawn(move || {
        let result = session.run();
        let _ = ended_tx.send(());
        result
    })?;

    let meta = mount.meta.clone();
    runtime.spawn(async move { meta.keep_alive(keepalive).await });
    let releases = mount.meta.clone();
    runtime.spawn(async move { releases.send_releases().await });
    let idle = mount.clone();
    runtime.spawn(async move { idle.commit_idle_writers().await });
    let mp = mountpoint.to_owned();
    runtime.spawn_blocking(move || {
        if let Err(e) = raise_readahead(&mp, 4096) {
            tracing::debug!("cannot raise readahead on {}: {e}", mp.display());
        }
    });
    tracing::info!(
        "mounted dfs (metaserver {}) on {}",
        config.cluster.metaserver,
        mountpoint.display()
    );
    ready.report("ok\n");

    runtime.block_on(async {
        let mut ended_rx = ended_rx;
        tokio::select! {
            _ = signals.recv() => {
                tracing::info!("unmounting {}", mountpoint.display());
                if tokio::time::timeout(Duration::from_secs(30), mount.flush_all()).await.is_err() {
                    tracing::error!("could not commit all written data within 30s");
                }
                if let Err(e) = unmounter.unmount() {
                    tracing::warn!("{} is busy ({e}); detaching it", mountpoint.display());
                    if let Err(e) = dfs_common::process::unmount(mountpoint, true) {
                        tracing::error!("cannot unmount {}: {e}", mountpoint.display());
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut ended_rx).await;
                mount.meta.close_session().await;
            }
            _ = &mut ended_rx => {
                tracing::info!("{} was unmounted", mountpoint.display());
                mount.meta.close_session().await;
            }
        }
    });
    if fuse_thread.is_finished()
        && let Ok(Err(e)) = fuse_thread.join()
    {
        tracing::warn!("FUSE session ended with an error: {e}");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The kernel reads FUSE files 128 KiB at a time unless the mount's readahead is raised.
fn raise_readahead(mountpoint: &Path, kb: u32) -> std::io::Result<()> {
    let dev = std::fs::metadata(mountpoint)?.dev();
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    std::fs::write(path, kb.to_string())
}
