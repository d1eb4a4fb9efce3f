//! Seeded randomized differential tests, the way trusted file systems are tested: random
//! sequences of operations run against a dfs mount and against a local directory, and after
//! every step the two must agree (each operation's outcome, then every name, kind, size, mode,
//! link count, explicitly set mtime and byte of the trees, and what open descriptors read).
//!
//! - `one_mount`: creates, positioned writes across chunk boundaries, truncates, renames over
//!   existing names, hard links, unlinks of open files, mkdir/rmdir, chmod, utimens, fsync,
//!   close and reopen, flock.
//! - `two_mounts`: the same namespace operations spread over two mounts, data written under
//!   flock (open, lock, write, unlock, close), every step checked through both mounts.
//! - `with_faults`: replicas = 2; storage daemons and the metaserver are killed (SIGKILL) and
//!   restarted at random points; everything `close()` or `fsync()` acknowledged must be there,
//!   and what failed must be either as before or as asked.
//!
//! The chunk size is 64 KiB, so small files cross chunk boundaries. A failure prints the seed
//! and the operations so far. `DFS_RANDOM_SEED=N` replays a seed; `DFS_RANDOM_SECS=S` keeps
//! generating new seeds for S seconds (a soak) and prints what it ran.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dfs_common::Config;
use dfs_tests::{Cluster, Options};

const CHUNK: u64 = 64 << 10;
const DIRS: [&str; 4] = ["", "d0", "d1", "d0/e"];
const FILES: [&str; 6] = ["f0", "f1", "f2", "f3", "f4", "f5"];

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn dir(&mut self) -> &'static str {
        DIRS[self.below(DIRS.len() as u64) as usize]
    }

    /// A directory other than the root.
    fn subdir(&mut self) -> &'static str {
        DIRS[1 + self.below(DIRS.len() as u64 - 1) as usize]
    }

    fn file(&mut self) -> &'static str {
        FILES[self.below(FILES.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A file offset, often right at or next to a chunk boundary.
    fn offset(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(5 * CHUNK),
            1 => {
                let boundary = (1 + self.below(4)) * CHUNK;
                boundary.saturating_sub(self.below(64))
            }
            2 => self.below(4096),
            _ => (1 + self.below(4)) * CHUNK + self.below(64),
        }
    }

    fn length(&mut self) -> u64 {
        match self.below(4) {
            0 => 1 + self.below(16),
            1 => 1 + self.below(8192),
            2 => 1 + self.below(2 * CHUNK),
            _ => CHUNK,
        }
    }
}

/// Bytes derived from a seed (so the log names them compactly).
fn bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// One operation, as the generator made it (printed on failure to replay it).
#[derive(Debug, Clone)]
enum Op {
    Create {
        path: String,
        keep_open: bool,
    },
    Open {
        path: String,
    },
    Pwrite {
        handle: usize,
        offset: u64,
        len: u64,
        seed: u64,
    },
    WritePath {
        path: String,
        offset: u64,
        len: u64,
        seed: u64,
    },
    Ftruncate {
        handle: usize,
        len: u64,
    },
    Truncate {
        path: String,
        len: u64,
    },
    ReadHandle {
        handle: usize,
        offset: u64,
        len: u64,
    },
    Fsync {
        handle: usize,
    },
    Close {
        handle: usize,
    },
    Flock {
        handle: usize,
        exclusive: bool,
    },
    Funlock {
        handle: usize,
    },
    Rename {
        from: String,
        to: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Utimens {
        path: String,
        secs: i64,
    },
    /// Two mounts: open on mount `on`, flock, write, unlock, close.
    LockedWrite {
        on: usize,
        path: String,
        offset: u64,
        len: u64,
        seed: u64,
    },
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

type Outcome = Result<(), i32>;

fn outcome<T>(r: std::io::Result<T>) -> Outcome {
    r.map(|_| ()).map_err(|e| errno_of(&e))
}

fn close_file(f: File) -> Outcome {
    outcome(dfs_tests::close(f))
}

fn flock(f: &File, op: i32) -> Outcome {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(errno_of(&std::io::Error::last_os_error()))
    }
}

fn set_mtime(path: &Path, secs: i64) -> Outcome {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 123_456_789,
        },
    ];
    // SAFETY: valid path and two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(errno_of(&std::io::Error::last_os_error()))
    }
}

/// A descriptor open on both sides.
struct Handle {
    dfs: File,
    local: File,
    /// The local inode: explicit times stop counting once it is written.
    ino: u64,
}

/// Two trees that must stay the same: one or more dfs mounts (the same cluster) and a local
/// directory.
struct Differential {
    mounts: Vec<PathBuf>,
    /// The mount path operations go to.
    on: usize,
    /// Whether descriptors stay open across operations. Not with two mounts: a file being
    /// written on one mount shows its new data and attributes on the other only once
    /// committed (at close, fsync, unlock or after 10 s idle), as close-to-open promises.
    keep_handles: bool,
    local: tempfile::TempDir,
    handles: BTreeMap<usize, Handle>,
    next_handle: usize,
    /// Local inodes whose mtime was set explicitly, with the time set: compared while the
    /// local file still has it (a later change, or the inode number reused, ends that).
    times_set: HashMap<u64, (i64, i64)>,
    log: Vec<String>,
    seed: u64,
    /// Operations that succeeded, and that failed the same way on both sides.
    succeeded: usize,
    refused: usize,
}

impl Differential {
    fn new(mounts: Vec<PathBuf>, seed: u64) -> Self {
        let local = tempfile::Builder::new()
            .prefix("dfs-model.")
            .tempdir()
            .expect("model dir");
        Differential {
            keep_handles: mounts.len() == 1,
            mounts,
            on: 0,
            local,
            handles: BTreeMap::new(),
            next_handle: 0,
            times_set: HashMap::new(),
            log: Vec::new(),
            seed,
            succeeded: 0,
            refused: 0,
        }
    }

    fn dfs(&self, on: usize, rel: &str) -> PathBuf {
        self.mounts[on].join(rel)
    }

    fn model(&self, rel: &str) -> PathBuf {
        self.local.path().join(rel)
    }

    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(400).collect();
        let mut ops = String::new();
        for l in tail.into_iter().rev() {
            ops.push_str(l);
            ops.push('\n');
        }
        panic!(
            "{what}\nseed {} ({} operations; replay: DFS_RANDOM_SEED={} cargo test -p dfs-tests --test random_ops)\n\
             operations (the last 400):\n{ops}",
            self.seed,
            self.log.len(),
            self.seed
        );
    }

    fn local_ino(&self, rel: &str) -> Option<u64> {
        fs::symlink_metadata(self.model(rel)).ok().map(|m| m.ino())
    }

    /// Generates the next operation for one mount.
    fn generate(&self, r: &mut Rng) -> Op {
        let dir = r.dir();
        let path = join(dir, r.file());
        let any_path = |r: &mut Rng| {
            if r.chance(20) {
                r.subdir().to_string()
            } else {
                join(r.dir(), r.file())
            }
        };
        let handle = (!self.handles.is_empty()).then(|| {
            let keys: Vec<usize> = self.handles.keys().copied().collect();
            *r.pick(&keys)
        });
        match (r.below(100), handle) {
            (0..=9, _) => Op::Create {
                path,
                keep_open: r.chance(60),
            },
            (10..=15, _) => Op::Open { path },
            (16..=33, Some(handle)) => Op::Pwrite {
                handle,
                offset: r.offset(),
                len: r.length(),
                seed: r.next(),
            },
            (16..=33, None) | (34..=41, _) => Op::WritePath {
                path,
                offset: r.offset(),
                len: r.length(),
                seed: r.next(),
            },
            (42..=45, Some(handle)) => Op::Ftruncate {
                handle,
                len: r.offset(),
            },
            (42..=45, None) | (46..=48, _) => Op::Truncate { path, len: r.offset() },
            (49..=53, Some(handle)) => Op::ReadHandle {
                handle,
                offset: r.offset(),
                len: r.length(),
            },
            (54..=56, Some(handle)) => Op::Fsync { handle },
            (57..=63, Some(handle)) => Op::Close { handle },
            (64..=65, Some(handle)) => Op::Flock {
                handle,
                exclusive: r.chance(70),
            },
            (66..=67, Some(handle)) => Op::Funlock { handle },
            (68..=74, _) => Op::Rename {
                from: any_path(r),
                to: any_path(r),
            },
            (75..=78, _) => Op::Link {
                from: path,
                to: join(r.dir(), r.file()),
            },
            (79..=85, _) => Op::Unlink { path },
            (86..=89, _) => Op::Mkdir {
                path: r.subdir().to_string(),
            },
            (90..=92, _) => Op::Rmdir {
                path: r.subdir().to_string(),
            },
            (93..=96, _) => Op::Chmod {
                path: any_path(r),
                mode: *r.pick(&[0o600, 0o644, 0o640, 0o755, 0o700, 0o4755]),
            },
            (_, _) => Op::Utimens {
                path: any_path(r),
                secs: 1_500_000_000 + r.below(100_000_000) as i64,
            },
        }
    }

    /// Applies `op` to both sides and fails the test if the outcomes differ.
    fn apply(&mut self, op: &Op) {
        self.log.push(format!("{op:?}"));
        let (dfs, local) = self.run(op);
        if dfs != local {
            self.fail(format!("{op:?}: dfs gave {dfs:?}, the local directory {local:?}"));
        }
        if dfs.is_ok() {
            self.succeeded += 1;
        } else {
            self.refused += 1;
        }
    }

    fn run(&mut self, op: &Op) -> (Outcome, Outcome) {
        match op {
            Op::Create { path, keep_open } => {
                let open = |p: PathBuf| {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(p)
                };
                let (d, l) = (open(self.dfs(self.on, path)), open(self.model(path)));
                if let Some(ino) = self.local_ino(path) {
                    self.times_set.remove(&ino);
                }
                self.keep(d, l, path, *keep_open)
            }
            Op::Open { path } => {
                let open = |p: PathBuf| OpenOptions::new().read(true).write(true).open(p);
                let (d, l) = (open(self.dfs(self.on, path)), open(self.model(path)));
                self.keep(d, l, path, true)
            }
            Op::Pwrite {
                handle,
                offset,
                len,
                seed,
            } => {
                let data = bytes(*seed, *len);
                let h = &self.handles[handle];
                self.times_set.remove(&h.ino);
                (
                    outcome(h.dfs.write_all_at(&data, *offset)),
                    outcome(h.local.write_all_at(&data, *offset)),
                )
            }
            Op::WritePath {
                path,
                offset,
                len,
                seed,
            } => {
                let data = bytes(*seed, *len);
                if let Some(ino) = self.local_ino(path) {
                    self.times_set.remove(&ino);
                }
                let write = |p: PathBuf| -> Outcome {
                    let f = OpenOptions::new().write(true).open(p).map_err(|e| errno_of(&e))?;
                    outcome(f.write_all_at(&data, *offset))?;
                    close_file(f)
                };
                (write(self.dfs(self.on, path)), write(self.model(path)))
            }
            Op::Ftruncate { handle, len } => {
                let h = &self.handles[handle];
                self.times_set.remove(&h.ino);
                (outcome(h.dfs.set_len(*len)), outcome(h.local.set_len(*len)))
            }
            Op::Truncate { path, len } => {
                if let Some(ino) = self.local_ino(path) {
                    self.times_set.remove(&ino);
                }
                let truncate = |p: PathBuf| {
                    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL");
                    // SAFETY: a valid path.
                    if unsafe { libc::truncate(c.as_ptr(), *len as i64) } == 0 {
                        Ok(())
                    } else {
                        Err(errno_of(&std::io::Error::last_os_error()))
                    }
                };
                (truncate(self.dfs(self.on, path)), truncate(self.model(path)))
            }
            Op::ReadHandle { handle, offset, len } => {
                let h = &self.handles[handle];
                let read = |f: &File| -> Result<Vec<u8>, i32> {
                    let mut buf = vec![0u8; *len as usize];
                    let mut got = 0;
                    while got < buf.len() {
                        match f.read_at(&mut buf[got..], offset + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) => return Err(errno_of(&e)),
                        }
                    }
                    buf.truncate(got);
                    Ok(buf)
                };
                let (d, l) = (read(&h.dfs), read(&h.local));
                let sizes = (
                    h.dfs.metadata().map(|m| m.len()).map_err(|e| errno_of(&e)),
                    h.local.metadata().map(|m| m.len()).map_err(|e| errno_of(&e)),
                );
                if sizes.0 != sizes.1 {
                    self.fail(format!(
                        "{op:?}: fstat sizes differ: dfs {:?}, local {:?}",
                        sizes.0, sizes.1
                    ));
                }
                match (d, l) {
                    (Ok(d), Ok(l)) if d != l => self.fail(format!(
                        "{op:?}: read {} bytes from dfs, {} locally, first difference at {:?}",
                        d.len(),
                        l.len(),
                        d.iter().zip(&l).position(|(a, b)| a != b)
                    )),
                    (d, l) => (d.map(|_| ()), l.map(|_| ())),
                }
            }
            Op::Fsync { handle } => {
                let h = &self.handles[handle];
                (outcome(h.dfs.sync_all()), outcome(h.local.sync_all()))
            }
            Op::Close { handle } => {
                let h = self.handles.remove(handle).expect("open handle");
                (close_file(h.dfs), close_file(h.local))
            }
            Op::Flock { handle, exclusive } => {
                let h = &self.handles[handle];
                let op = if *exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
                (flock(&h.dfs, op | libc::LOCK_NB), flock(&h.local, op | libc::LOCK_NB))
            }
            Op::Funlock { handle } => {
                let h = &self.handles[handle];
                (flock(&h.dfs, libc::LOCK_UN), flock(&h.local, libc::LOCK_UN))
            }
            Op::Rename { from, to } => (
                outcome(fs::rename(self.dfs(self.on, from), self.dfs(self.on, to))),
                outcome(fs::rename(self.model(from), self.model(to))),
            ),
            Op::Link { from, to } => (
                outcome(fs::hard_link(self.dfs(self.on, from), self.dfs(self.on, to))),
                outcome(fs::hard_link(self.model(from), self.model(to))),
            ),
            Op::Unlink { path } => (
                outcome(fs::remove_file(self.dfs(self.on, path))),
                outcome(fs::remove_file(self.model(path))),
            ),
            Op::Mkdir { path } => (
                outcome(fs::create_dir(self.dfs(self.on, path))),
                outcome(fs::create_dir(self.model(path))),
            ),
            Op::Rmdir { path } => (
                outcome(fs::remove_dir(self.dfs(self.on, path))),
                outcome(fs::remove_dir(self.model(path))),
            ),
            Op::Chmod { path, mode } => (
                outcome(fs::set_permissions(
                    self.dfs(self.on, path),
                    fs::Permissions::from_mode(*mode),
                )),
                outcome(fs::set_permissions(self.model(path), fs::Permissions::from_mode(*mode))),
            ),
            Op::Utimens { path, secs } => {
                let d = set_mtime(&self.dfs(self.on, path), *secs);
                let l = set_mtime(&self.model(path), *secs);
                // Files only: a directory's mtime moves with every entry made in it.
                if l.is_ok()
                    && let Ok(meta) = fs::symlink_metadata(self.model(path))
                    && meta.is_file()
                {
                    self.times_set.insert(meta.ino(), (meta.mtime(), meta.mtime_nsec()));
                }
                (d, l)
            }
            Op::LockedWrite {
                on,
                path,
                offset,
                len,
                seed,
            } => {
                let data = bytes(*seed, *len);
                if let Some(ino) = self.local_ino(path) {
                    self.times_set.remove(&ino);
                }
                let write = |p: PathBuf| -> Outcome {
                    let f = OpenOptions::new().write(true).open(p).map_err(|e| errno_of(&e))?;
                    flock(&f, libc::LOCK_EX)?;
                    outcome(f.write_all_at(&data, *offset))?;
                    flock(&f, libc::LOCK_UN)?;
                    close_file(f)
                };
                (write(self.dfs(*on, path)), write(self.model(path)))
            }
        }
    }

    /// Keeps a descriptor pair if both opened (closing them now unless `keep`).
    fn keep(
        &mut self,
        d: std::io::Result<File>,
        l: std::io::Result<File>,
        path: &str,
        keep: bool,
    ) -> (Outcome, Outcome) {
        match (d, l) {
            (Ok(d), Ok(l)) => {
                if !keep || !self.keep_handles || self.handles.len() >= 6 {
                    return (close_file(d), close_file(l));
                }
                let ino = l.metadata().map(|m| m.ino()).unwrap_or(0);
                let id = self.next_handle;
                self.next_handle += 1;
                self.handles.insert(id, Handle { dfs: d, local: l, ino });
                self.log.push(format!("  -> handle {id} on {path}"));
                (Ok(()), Ok(()))
            }
            (d, l) => (
                d.map(|_| ()).map_err(|e| errno_of(&e)),
                l.map(|_| ()).map_err(|e| errno_of(&e)),
            ),
        }
    }

    /// Compares every mount's tree with the model.
    fn check(&self) {
        for on in 0..self.mounts.len() {
            self.compare_dir(on, "");
        }
    }

    fn compare_dir(&self, on: usize, rel: &str) {
        let names = |p: PathBuf| -> BTreeSet<String> {
            match fs::read_dir(&p) {
                Ok(d) => d
                    .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(e) => self.fail(format!("listing {}: {e}", p.display())),
            }
        };
        let (d, l) = (names(self.dfs(on, rel)), names(self.model(rel)));
        if d != l {
            self.fail(format!(
                "mount {on}, directory {rel:?}: dfs lists {d:?}, the model {l:?}"
            ));
        }
        for name in l {
            let child = join(rel, &name);
            let dm = fs::symlink_metadata(self.dfs(on, &child))
                .unwrap_or_else(|e| self.fail(format!("mount {on}: stat {child}: {e}")));
            let lm = fs::symlink_metadata(self.model(&child)).expect("model stat");
            let show = |m: &fs::Metadata| (m.file_type().is_dir(), m.mode() & 0o7777, m.nlink());
            if show(&dm) != show(&lm) {
                self.fail(format!(
                    "mount {on}, {child}: (dir, mode, nlink) dfs {:?}, model {:?}",
                    show(&dm),
                    show(&lm)
                ));
            }
            let explicit = self.times_set.get(&lm.ino()) == Some(&(lm.mtime(), lm.mtime_nsec())) && lm.is_file();
            if explicit && (dm.mtime(), dm.mtime_nsec()) != (lm.mtime(), lm.mtime_nsec()) {
                self.fail(format!(
                    "mount {on}, {child}: mtime set to {}.{:09}, dfs shows {}.{:09}",
                    lm.mtime(),
                    lm.mtime_nsec(),
                    dm.mtime(),
                    dm.mtime_nsec()
                ));
            }
            if lm.is_dir() {
                self.compare_dir(on, &child);
                continue;
            }
            if dm.len() != lm.len() {
                self.fail(format!(
                    "mount {on}, {child}: size {} on dfs, {} in the model",
                    dm.len(),
                    lm.len()
                ));
            }
            let data =
                fs::read(self.dfs(on, &child)).unwrap_or_else(|e| self.fail(format!("mount {on}: read {child}: {e}")));
            let want = fs::read(self.model(&child)).expect("model read");
            if data != want {
                self.fail(format!(
                    "mount {on}, {child}: content differs ({} bytes on dfs, {} in the model), first at {:?}",
                    data.len(),
                    want.len(),
                    data.iter().zip(&want).position(|(a, b)| a != b)
                ));
            }
        }
    }

    /// Closes what is open (every close must agree too).
    fn finish(&mut self) {
        let ids: Vec<usize> = self.handles.keys().copied().collect();
        for handle in ids {
            self.apply(&Op::Close { handle });
        }
        self.check();
    }
}

/// The seeds to run: the one asked for, a fixed one, or new ones for as long as asked.
fn seeds(fixed: u64) -> Box<dyn Iterator<Item = u64>> {
    if let Ok(s) = std::env::var("DFS_RANDOM_SEED") {
        return Box::new(std::iter::once(s.parse().expect("DFS_RANDOM_SEED is a number")));
    }
    match std::env::var("DFS_RANDOM_SECS") {
        Ok(secs) => {
            let until = Instant::now() + Duration::from_secs(secs.parse().expect("DFS_RANDOM_SECS is a number"));
            let start = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64;
            Box::new(
                (0..)
                    .map(move |i| start.wrapping_add(i))
                    .take_while(move |_| Instant::now() < until),
            )
        }
        Err(_) => Box::new(std::iter::once(fixed)),
    }
}

/// Operations per seed (more per seed when soaking).
fn ops_per_seed(ci: usize) -> usize {
    if std::env::var_os("DFS_RANDOM_SECS").is_some() {
        ci * 3
    } else {
        ci
    }
}

fn small_chunks(c: &mut Config) {
    let m = c.metaserver.as_mut().expect("metaserver section");
    m.chunk_size = CHUNK;
}

fn small_chunks_no_cache(c: &mut Config) {
    small_chunks(c);
    let client = c.client.as_mut().expect("client section");
    client.attr_timeout_ms = 0;
    client.entry_timeout_ms = 0;
}

/// Clears a mount's tree (between seeds).
fn clear(root: &Path) {
    for e in fs::read_dir(root).expect("list root") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("clearing {}: {e}", p.display()));
        } else {
            fs::remove_file(&p).unwrap_or_else(|e| panic!("clearing {}: {e}", p.display()));
        }
    }
}

#[test]
fn one_mount() {
    let mut cluster = Cluster::with(Options {
        storage_daemons: 2,
        tweak: small_chunks,
        ..Options::default()
    });
    let mnt = cluster.mount();
    let (mut total, mut runs, mut ok) = (0, 0, 0);
    for seed in seeds(1) {
        clear(&mnt);
        let mut d = Differential::new(vec![mnt.clone()], seed);
        let mut r = Rng(seed);
        for _ in 0..ops_per_seed(400) {
            let op = d.generate(&mut r);
            d.apply(&op);
            d.check();
        }
        d.finish();
        total += d.succeeded + d.refused;
        ok += d.succeeded;
        runs += 1;
    }
    println!("one_mount: {runs} seeds, {total} operations ({ok} succeeded, the rest refused alike), 0 failures");
}

#[test]
fn two_mounts() {
    let mut cluster = Cluster::with(Options {
        storage_daemons: 2,
        tweak: small_chunks_no_cache,
        ..Options::default()
    });
    let mounts = vec![cluster.mount(), cluster.mount()];
    let (mut total, mut runs, mut ok) = (0, 0, 0);
    for seed in seeds(2) {
        clear(&mounts[0]);
        let mut d = Differential::new(mounts.clone(), seed);
        let mut r = Rng(seed);
        for _ in 0..ops_per_seed(250) {
            let on = r.below(2) as usize;
            let op = match d.generate(&mut r) {
                // Data goes through a lock on whichever mount writes: what one holder wrote,
                // the next reads.
                Op::Pwrite { offset, len, seed, .. } | Op::WritePath { offset, len, seed, .. } => Op::LockedWrite {
                    on,
                    path: join(r.dir(), r.file()),
                    offset,
                    len,
                    seed,
                },
                op => op,
            };
            d.on = on;
            d.log.push(format!("on mount {on}:"));
            d.apply(&op);
            d.check();
        }
        d.on = 0;
        d.finish();
        total += d.succeeded + d.refused;
        ok += d.succeeded;
        runs += 1;
    }
    println!("two_mounts: {runs} seeds, {total} operations ({ok} succeeded, the rest refused alike), 0 failures");
}

// ------------------------------------------------------------------------------------------------
// Faults

/// What a file may hold: exactly this (acknowledged), or one of several (an operation failed
/// and may or may not have been applied).
#[derive(Debug, Clone)]
struct Expected {
    candidates: Vec<Option<Vec<u8>>>,
}

/// The faults variant's model: each file's acknowledged content (None: absent).
struct FaultModel {
    files: BTreeMap<String, Expected>,
    log: Vec<String>,
    seed: u64,
}

impl FaultModel {
    fn fail(&self, what: String) -> ! {
        let mut ops = String::new();
        for l in self.log.iter().rev().take(300).collect::<Vec<_>>().into_iter().rev() {
            ops.push_str(l);
            ops.push('\n');
        }
        panic!(
            "{what}\nseed {} ({} steps; replay: DFS_RANDOM_SEED={} cargo test -p dfs-tests --test random_ops with_faults)\n\
             steps (the last 300):\n{ops}",
            self.seed,
            self.log.len(),
            self.seed
        );
    }

    fn current(&self, path: &str) -> Vec<Option<Vec<u8>>> {
        self.files
            .get(path)
            .map(|e| e.candidates.clone())
            .unwrap_or_else(|| vec![None])
    }

    /// Records an operation's outcome: on success the file is `after`; after ENOENT nothing
    /// changed; after another failure (a fault) it is what it may have been before, `after`,
    /// or (for a write that created the file) the file created with nothing written.
    fn record(&mut self, path: &str, result: &Step, after: impl Fn(&Option<Vec<u8>>) -> Option<Vec<u8>>) {
        let before = self.current(path);
        let mut candidates: Vec<Option<Vec<u8>>> = match result {
            Step::Done => before.iter().map(&after).collect(),
            Step::Absent => return,
            Step::Unknown { creates } => {
                let mut c: Vec<Option<Vec<u8>>> = before.iter().map(&after).collect();
                if *creates {
                    c.extend(before.iter().map(|b| Some(b.clone().unwrap_or_default())));
                }
                c.extend(before);
                c
            }
        };
        candidates.sort();
        candidates.dedup();
        self.files.insert(path.to_owned(), Expected { candidates });
    }

    /// Adds candidates derived from each current one.
    fn widen(&mut self, path: &str, more: impl Fn(&Option<Vec<u8>>) -> Vec<Option<Vec<u8>>>) {
        let mut candidates = self.current(path);
        let extra: Vec<Option<Vec<u8>>> = candidates.iter().flat_map(&more).collect();
        candidates.extend(extra);
        candidates.sort();
        candidates.dedup();
        self.files.insert(path.to_owned(), Expected { candidates });
    }

    /// Reads every file and checks it holds one of its candidates (narrowing to it).
    fn verify(&mut self, mnt: &Path, what: &str) {
        let paths: Vec<String> = self.files.keys().cloned().collect();
        for path in paths {
            let candidates = self.current(&path);
            let got = match fs::read(mnt.join(&path)) {
                Ok(d) => Some(d),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => self.fail(format!("{what}: reading {path}: {e}")),
            };
            if !candidates.contains(&got) {
                self.fail(format!(
                    "{what}: {path} holds {:?} bytes, expected one of {:?} (lengths; None = absent)",
                    got.as_ref().map(Vec::len),
                    candidates.iter().map(|c| c.as_ref().map(Vec::len)).collect::<Vec<_>>()
                ));
            }
            self.files.insert(path, Expected { candidates: vec![got] });
        }
    }
}

/// How a step of the faults variant ended.
#[derive(Debug)]
enum Step {
    Done,
    /// ENOENT: the file was not there, nothing changed.
    Absent,
    /// Failed some other way (a fault): it may or may not have happened.
    Unknown {
        creates: bool,
    },
}

impl Step {
    fn of(r: std::io::Result<()>, creates: bool) -> Step {
        match r {
            Ok(()) => Step::Done,
            Err(e) if e.kind() == ErrorKind::NotFound => Step::Absent,
            Err(_) => Step::Unknown { creates },
        }
    }
}

fn faults_config(c: &mut Config) {
    small_chunks(c);
    let m = c.metaserver.as_mut().expect("metaserver section");
    m.replicas = 2;
    m.session_timeout_ms = 10_000;
    if let Some(client) = c.client.as_mut() {
        client.data_timeout_ms = 8_000;
        // Requests during a metaserver outage fail sooner, so outages cost fewer seconds.
        client.request_timeout_ms = 2_000;
    }
}

/// Writes `data` at `offset` into `path` (creating it), closing it; the outcome of the step
/// that failed.
fn write_at(path: &Path, offset: u64, data: &[u8], fsync: bool) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    f.write_all_at(data, offset)?;
    if fsync {
        f.sync_all()?;
    }
    dfs_tests::close(f)
}

fn apply_write(before: &Option<Vec<u8>>, offset: u64, data: &[u8]) -> Option<Vec<u8>> {
    let mut v = before.clone().unwrap_or_default();
    let end = offset as usize + data.len();
    if v.len() < end {
        v.resize(end, 0);
    }
    v[offset as usize..end].copy_from_slice(data);
    Some(v)
}

#[test]
fn with_faults() {
    let mut cluster = Cluster::with(Options {
        storage_daemons: 3,
        tweak: faults_config,
        ..Options::default()
    });
    let mnt = cluster.mount();
    let daemons = cluster.daemon_names();
    let (mut steps, mut faults, mut runs, mut failed_ops) = (0usize, 0usize, 0, 0usize);
    for seed in seeds(3) {
        clear(&mnt);
        let mut m = FaultModel {
            files: BTreeMap::new(),
            log: Vec::new(),
            seed,
        };
        let mut r = Rng(seed);
        let mut down: Option<String> = None;
        let mut meta_down = false;
        // Steps until what is down comes back.
        let mut restore_in = 0u64;
        let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
        for i in 0..ops_per_seed(150) {
            // Faults: kill a daemon (one at a time: replicas = 2) or the metaserver, and bring
            // them back a few steps later.
            let faulty = down.is_some() || meta_down;
            if faulty && restore_in == 0 {
                if let Some(name) = down.take() {
                    m.log.push(format!("restart {name}"));
                    cluster.start_daemon(&name);
                } else {
                    m.log.push("restart metaserver".into());
                    cluster.start_metaserver();
                    meta_down = false;
                }
            } else if faulty {
                restore_in -= 1;
            } else if r.chance(8) {
                let longest = if r.chance(50) { 2 } else { 6 };
                restore_in = 1 + r.below(longest);
                if r.chance(30) {
                    m.log.push("kill -9 metaserver".into());
                    cluster.kill_metaserver();
                    meta_down = true;
                    faults += 1;
                } else {
                    let name = r.pick(&daemons).clone();
                    m.log.push(format!("kill -9 {name}"));
                    cluster.kill_daemon(&name);
                    down = Some(name);
                    faults += 1;
                }
            }
            let path = r.pick(&names).clone();
            let target = mnt.join(&path);
            let (step, what) = match r.below(10) {
                0..=5 => {
                    let (offset, len, dseed) = (r.offset(), r.length(), r.next());
                    let fsync = r.chance(30);
                    let data = bytes(dseed, len);
                    let step = Step::of(write_at(&target, offset, &data, fsync), true);
                    m.record(&path, &step, |b| apply_write(b, offset, &data));
                    if matches!(step, Step::Unknown { .. }) {
                        // write() may have taken a part (up to a chunk boundary) before failing:
                        // that part may have been committed by the close.
                        m.widen(&path, |b| {
                            (1..)
                                .map(|k| (offset / CHUNK + k) * CHUNK - offset)
                                .take_while(|&n| n < len)
                                .map(|n| apply_write(b, offset, &data[..n as usize]))
                                .collect()
                        });
                    }
                    (
                        step,
                        format!("write {path} at {offset} len {len} seed {dseed} fsync {fsync}"),
                    )
                }
                6 => {
                    let len = r.offset();
                    let result = OpenOptions::new().write(true).open(&target).and_then(|f| {
                        f.set_len(len)?;
                        dfs_tests::close(f)
                    });
                    let step = Step::of(result, false);
                    m.record(&path, &step, |b| {
                        b.clone().map(|mut v| {
                            v.resize(len as usize, 0);
                            v
                        })
                    });
                    (step, format!("truncate {path} to {len}"))
                }
                7 => {
                    let to = r.pick(&names).clone();
                    let step = Step::of(fs::rename(&target, mnt.join(&to)), false);
                    let moved = m.current(&path);
                    if path != to {
                        if matches!(step, Step::Done) {
                            m.files.insert(
                                to.clone(),
                                Expected {
                                    candidates: moved.clone(),
                                },
                            );
                            m.files.insert(path.clone(), Expected { candidates: vec![None] });
                        } else if matches!(step, Step::Unknown { .. }) {
                            let mut t = m.current(&to);
                            t.extend(moved.iter().cloned());
                            let mut f = moved.clone();
                            f.push(None);
                            m.files.insert(to.clone(), Expected { candidates: t });
                            m.files.insert(path.clone(), Expected { candidates: f });
                        }
                    }
                    (step, format!("rename {path} {to}"))
                }
                _ => {
                    let step = Step::of(fs::remove_file(&target), false);
                    m.record(&path, &step, |_| None);
                    (step, format!("unlink {path}"))
                }
            };
            if matches!(step, Step::Unknown { .. }) {
                failed_ops += 1;
            }
            m.log.push(format!("{i}: {what} -> {step:?}"));
            // With everything up, what was acknowledged is there. "Up" is what the metaserver
            // knows: a daemon restarted a step ago may not have registered yet, and a chunk
            // whose copies are all on it is unreadable (EIO) until it has.
            if down.is_none() && !meta_down && r.chance(15) {
                cluster.wait_all_up();
                m.verify(&mnt, &format!("step {i}"));
            }
        }
        if let Some(name) = down.take() {
            cluster.start_daemon(&name);
        }
        if meta_down {
            cluster.start_metaserver();
        }
        cluster.wait_all_up();
        m.verify(&mnt, "at the end");
        steps += m.log.len();
        runs += 1;
    }
    println!(
        "with_faults: {runs} seeds, {steps} steps, {faults} faults injected, {failed_ops} operations failed during faults (allowed), 0 lost"
    );
}
