//! Test harness: a real cluster (metaserver, storage daemons, FUSE mounts) of separate
//! processes on 127.0.0.1, in a temporary directory, driven like an operator would.
//!
//! The binaries are built (incrementally) by the first test that needs them, with the same
//! profile as the tests. Everything is torn down on drop, mounts first; if the test failed, the
//! tail of every process log is printed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dfs_common::Config;
use dfs_proto::meta::ClusterReport;

pub mod data;

/// Directory holding the dfs binaries, built on first use.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // target/<profile>/deps/<test exe> -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(Path::parent).expect("target dir").to_owned();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Cargo describes the test's own package in the environment; build scripts that watch
        // those variables (ring's do) would otherwise rebuild on every switch between this
        // build and `cargo test`.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .iter()
            .any(|p| k.starts_with(p))
            {
                cmd.env_remove(&key);
            }
        }
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "dfs-metaserver",
            "-p",
            "dfs-storaged",
            "-p",
            "dfs-mount",
            "-p",
            "dfs-admin",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the dfs binaries failed");
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command to completion, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh(script: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(script))
}

struct Proc {
    child: Child,
    started: Instant,
}

impl Proc {
    fn signal(&mut self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for a test cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub storage_daemons: usize,
    /// The IP address every process listens on.
    pub host: &'static str,
    /// Edits applied to the generated config before anything starts.
    pub tweak: fn(&mut Config),
}

impl Default for Options {
    fn default() -> Self {
        Options {
            storage_daemons: 3,
            host: "127.0.0.1",
            tweak: |_| {},
        }
    }
}

pub struct Cluster {
    dir: tempfile::TempDir,
    pub config: Config,
    meta: Option<Proc>,
    daemons: BTreeMap<String, Proc>,
    mounts: Vec<(PathBuf, Proc)>,
    next_mount: usize,
}

impl Cluster {
    /// A running cluster with `n` storage daemons (all registered and up), not yet mounted.
    pub fn start(n: usize) -> Cluster {
        Cluster::with(Options {
            storage_daemons: n,
            ..Options::default()
        })
    }

    pub fn with(opts: Options) -> Cluster {
        bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("dfs-test.")
            .tempdir()
            .expect("temp dir");
        let mut config =
            dfs_admin::local::prepare(dir.path(), opts.storage_daemons, opts.host, None).expect("cluster dir");
        (opts.tweak)(&mut config);
        config.save(&config.path).expect("save config");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let mut cluster = Cluster {
            dir,
            config,
            meta: None,
            daemons: BTreeMap::new(),
            mounts: Vec::new(),
            next_mount: 0,
        };
        cluster.start_metaserver();
        let names: Vec<String> = cluster.config.storaged.iter().map(|s| s.name.clone()).collect();
        for name in &names {
            cluster.start_daemon(name);
        }
        cluster.wait_all_up();
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config.path
    }

    fn spawn(&self, log_name: &str, bin_name: &str, args: &[&str]) -> Proc {
        let log = self.dir.path().join("logs").join(format!("{log_name}.log"));
        let out = File::options().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(bin(bin_name))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("DFS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin_name}: {e}"));
        Proc {
            child,
            started: Instant::now(),
        }
    }

    fn config_arg(&self) -> String {
        self.config.path.to_string_lossy().into_owned()
    }

    pub fn start_metaserver(&mut self) {
        assert!(self.meta.is_none(), "metaserver already running");
        let p = self.spawn("metaserver", "dfs-metaserver", &["--config", &self.config_arg()]);
        self.meta = Some(p);
        wait_until("the metaserver to answer", Duration::from_secs(20), || {
            self.try_status().is_some()
        });
    }

    pub fn kill_metaserver(&mut self) {
        self.meta.take().expect("metaserver running").kill9();
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the metaserver.
    pub fn signal_metaserver(&mut self, sig: i32) {
        self.meta.as_mut().expect("metaserver running").signal(sig);
    }

    pub fn start_daemon(&mut self, name: &str) {
        assert!(!self.daemons.contains_key(name), "{name} already running");
        let p = self.spawn(name, "dfs-storaged", &["--config", &self.config_arg(), "--name", name]);
        self.daemons.insert(name.to_owned(), p);
    }

    pub fn kill_daemon(&mut self, name: &str) {
        self.daemons
            .remove(name)
            .unwrap_or_else(|| panic!("{name} not running"))
            .kill9();
    }

    /// Adds a storage daemon to the cluster's config and starts it; returns its name.
    pub fn add_daemon(&mut self) -> String {
        let n = self.config.storaged.len() + 1;
        let host = self.config.storaged[0]
            .listen
            .rsplit_once(':')
            .map(|(h, _)| h.to_owned());
        let host = host.unwrap_or_else(|| "127.0.0.1".into());
        self.config = dfs_admin::local::prepare(self.dir.path(), n, &host, None).expect("add daemon");
        let name = self.config.storaged.last().expect("daemon").name.clone();
        self.start_daemon(&name);
        name
    }

    /// Sends a signal (SIGSTOP, SIGCONT...) to a storage daemon.
    pub fn signal_daemon(&mut self, name: &str, sig: i32) {
        self.daemons
            .get_mut(name)
            .unwrap_or_else(|| panic!("{name} not running"))
            .signal(sig);
    }

    /// Where `piece` is stored on daemon `name` (whether or not it is there).
    pub fn piece_path(&self, name: &str, piece: u64) -> PathBuf {
        let s = self.config.storaged(Some(name)).expect("daemon in config");
        dfs_storaged::layout::Layout::new(self.data_dir(name), s.fanout).piece_path(piece)
    }

    /// Piece files stored by daemon `name`.
    pub fn stored_pieces(&self, name: &str) -> usize {
        let dir = self.data_dir(name).join("pieces");
        if dir.exists() { count_files(&dir) } else { 0 }
    }

    pub fn daemon_names(&self) -> Vec<String> {
        self.config.storaged.iter().map(|s| s.name.clone()).collect()
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        let s = self.config.storaged(Some(name)).expect("daemon in config");
        self.config.resolve(&s.data_dir)
    }

    /// `dfs status --json`, or None if the metaserver does not answer.
    pub fn try_status(&self) -> Option<ClusterReport> {
        let out = Command::new(bin("dfs"))
            .args(["status", "--json", "--config", &self.config_arg()])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("status JSON"))
    }

    pub fn status(&self) -> ClusterReport {
        self.try_status().expect("dfs status failed")
    }

    /// Waits until every running daemon is registered and up, each heard from since it was
    /// (re)started: a daemon killed and started again before the metaserver noticed still
    /// counts as up, but only its new process's heartbeat says it is serving again.
    pub fn wait_all_up(&self) {
        let since: Vec<(String, Instant)> = self.daemons.iter().map(|(n, p)| (n.clone(), p.started)).collect();
        wait_until("all storage daemons up", Duration::from_secs(20), || {
            // The report is made after this instant: a heartbeat it dates less than (asked -
            // started) ago came from the new process.
            let asked = Instant::now();
            self.try_status().is_some_and(|r| {
                since.iter().all(|(n, started)| {
                    let running_for = asked.saturating_duration_since(*started);
                    r.nodes.iter().any(|x| {
                        &x.node.name == n
                            && x.node.up
                            && x.last_seen_ms.is_some_and(|ms| Duration::from_millis(ms) < running_for)
                    })
                })
            })
        });
    }

    pub fn wait_daemon_state(&self, name: &str, up: bool, timeout: Duration) {
        wait_until(
            &format!("{name} to be {}", if up { "up" } else { "down" }),
            timeout,
            || {
                self.try_status()
                    .is_some_and(|r| r.nodes.iter().any(|x| x.node.name == name && x.node.up == up))
            },
        );
    }

    /// Mounts the cluster at a fresh directory (foreground mount process) and returns it.
    pub fn mount(&mut self) -> PathBuf {
        self.next_mount += 1;
        let mp = self.dir.path().join(format!("mnt{}", self.next_mount));
        std::fs::create_dir_all(&mp).expect("mount point");
        self.mount_at(&mp);
        mp
    }

    pub fn mount_at(&mut self, mp: &Path) {
        let name = format!("mount-{}", mp.file_name().unwrap().to_string_lossy());
        let p = self.spawn(
            &name,
            "dfs-mount",
            &["--config", &self.config_arg(), "--foreground", &mp.to_string_lossy()],
        );
        self.mounts.push((mp.to_owned(), p));
        wait_until(
            &format!("{} to be mounted", mp.display()),
            Duration::from_secs(20),
            || dfs_common::process::is_dfs_mounted(mp),
        );
    }

    /// Stops a mount the way an operator would (SIGTERM: flush, unmount).
    pub fn unmount(&mut self, mp: &Path) {
        let i = self.mounts.iter().position(|(p, _)| p == mp).expect("mounted");
        let (path, mut p) = self.mounts.remove(i);
        p.stop(Duration::from_secs(20));
        if dfs_common::process::is_dfs_mounted(&path) {
            let _ = dfs_common::process::unmount(&path, true);
        }
    }

    /// Sends a signal (SIGSTOP, SIGCONT...) to the process serving mount `mp`.
    pub fn signal_mount(&mut self, mp: &Path, sig: i32) {
        let (_, p) = self.mounts.iter_mut().find(|(p, _)| p == mp).expect("mounted");
        p.signal(sig);
    }

    /// Kills a mount process outright and detaches its (now dead) mount point.
    pub fn kill_mount(&mut self, mp: &Path) {
        let i = self.mounts.iter().position(|(p, _)| p == mp).expect("mounted");
        let (path, mut p) = self.mounts.remove(i);
        p.kill9();
        let _ = dfs_common::process::unmount(&path, true);
    }

    /// Every log line of every process so far (for assertions about what operators see).
    pub fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) {
            for e in entries.flatten() {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }

    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) else {
            return;
        };
        let mut err = std::io::stderr().lock();
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(err, "----- {} (last 60 lines)", e.path().display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                let _ = writeln!(err, "{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("DFS_TEST_LOGS").is_some() {
            self.dump_logs();
        }
        for (path, mut p) in std::mem::take(&mut self.mounts) {
            p.stop(Duration::from_secs(10));
            if dfs_common::process::is_dfs_mounted(&path) {
                let _ = dfs_common::process::unmount(&path, true);
            }
        }
        for p in self.daemons.values_mut() {
            p.stop(Duration::from_secs(5));
        }
        if let Some(mut p) = self.meta.take() {
            p.stop(Duration::from_secs(5));
        }
        if std::thread::panicking() && std::env::var_os("DFS_TEST_KEEP").is_some() {
            // Whole logs and data stay for a post-mortem.
            self.dir.disable_cleanup(true);
            eprintln!("kept {} (DFS_TEST_KEEP)", self.dir.path().display());
        }
    }
}

/// Every directory under `root` with more than `max` entries.
pub fn crowded_dirs(root: &Path, max: usize) -> Vec<(PathBuf, usize)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let entries: Vec<_> = std::fs::read_dir(&d).expect("read dir").flatten().collect();
        if entries.len() > max {
            out.push((d.clone(), entries.len()));
        }
        for e in entries {
            if e.file_type().expect("file type").is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Regular files under `root`.
pub fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                n += 1;
            }
        }
    }
    n
}

/// Where each chunk of `paths` lives, per `dfs locate --json`.
pub fn locate(cluster: &Cluster, paths: &[PathBuf]) -> Vec<Located> {
    let out = run(Command::new(bin("dfs"))
        .args(["locate", "--json", "--config"])
        .arg(cluster.config_path())
        .args(paths));
    serde_json::from_slice(&out.stdout).expect("locate JSON")
}

#[derive(Debug, serde::Deserialize)]
pub struct Located {
    pub path: PathBuf,
    pub ino: u64,
    pub size: u64,
    pub chunks: Vec<dfs_proto::meta::ChunkLocation>,
}

impl Located {
    /// Names of the daemons holding this file's chunks.
    pub fn holders(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .chunks
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| n.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Runs `f` and returns its result with how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed())
}

/// Fails the test unless the two files have the same bytes (`cmp`).
pub fn cmp(a: &Path, b: &Path) {
    run(Command::new("cmp").arg(a).arg(b));
}

/// Applies the same positioned write to a file on the mount and to a local model of it.
pub fn write_both(mounted: &File, model: &File, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    mounted.write_all_at(data, offset).expect("write on the mount");
    model.write_all_at(data, offset).expect("write to the model");
}

/// Closes `file`, returning the error `close()` reports (dropping a `File` ignores it, and
/// `close()` is where a distributed file system reports a failed commit).
pub fn close(file: File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: closing the descriptor we own, once.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a whole file and closes it, reporting an error from `close()` too (`fs::write`
/// ignores it).
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    close(f)
}

/// Drops the kernel's page cache, so reads go to the storage daemons.
pub fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
