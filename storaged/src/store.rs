//! The piece store: durable writes, ranged reads and deletes of pieces under a data directory.
//!
//! All functions here block; the server calls them from tokio's blocking pool.
//! A write is visible (and acknowledged) only once it is durable: data written to a temporary
//! file, the file fsync'd, linked (or renamed) into place, and the directory fsync'd.
//!
//! Temporary files are unnamed (`O_TMPFILE`) where the file system supports it: they have no
//! directory entry until they are complete, and an abandoned write leaves nothing behind.
//! Elsewhere they are named files in the `tmp/` tree (which also keeps to the fanout).

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dfs_proto::meta::{BasePiece, StoredPiece};
use dfs_proto::types::{NodeUsage, PieceId};
use dfs_proto::{ErrorKind as WireKind, RemoteError};

use crate::layout::{LOCK_FILE, Layout};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("piece {piece} not found")]
    NotFound { piece: PieceId },
    #[error("no space left for piece {piece}: {reason}")]
    NoSpace { piece: PieceId, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {dir} is in use by another dfs-storaged")]
    Locked { dir: PathBuf },
}

impl StoreError {
    pub fn to_remote(&self) -> RemoteError {
        let kind = match self {
            StoreError::NotFound { .. } => WireKind::NotFound,
            StoreError::NoSpace { .. } => WireKind::NoSpace,
            StoreError::Io { .. } | StoreError::Locked { .. } => WireKind::Io,
        };
        RemoteError::new(kind, self.to_string())
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Opens a directory and fsyncs it, making its entries durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    pieces: u64,
    bytes: u64,
}

pub struct PieceStore {
    layout: Layout,
    capacity_limit: u64,
    /// Whether temporary files can be unnamed (O_TMPFILE) on this file system.
    unnamed_temps: bool,
    next_temp: AtomicU64,
    counters: Mutex<Counters>,
    // Held for the life of the store: a second daemon on the same directory is refused.
    _lock: File,
}

impl PieceStore {
    /// Opens (creating if needed) a data directory, removes leftovers of interrupted writes and
    /// counts what is stored.
    pub fn open(root: &Path, fanout: u32, capacity_limit: u64) -> Result<Self, StoreError> {
        Self::open_with(root, fanout, capacity_limit, true)
    }

    fn open_with(root: &Path, fanout: u32, capacity_limit: u64, allow_unnamed: bool) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io_err("create", root))?;
        let layout = Layout::new(root, fanout);
        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked { dir: root.to_owned() });
        }
        let tmp = layout.tmp_dir();
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("clean", &tmp))?;
        }
        for dir in [layout.pieces_dir(), tmp] {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        sync_dir(root)?;
        let unnamed_temps = match probe_unnamed_temps(root) {
            Ok(()) => allow_unnamed,
            Err(e) => {
                tracing::info!("{}: no O_TMPFILE ({e}); using named temporary files", root.display());
                false
            }
        };
        let store = PieceStore {
            layout,
            capacity_limit,
            unnamed_temps,
            next_temp: AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
            _lock: lock,
        };
        let mut counters = Counters::default();
        store.walk(&mut |p| {
            counters.pieces += 1;
            counters.bytes += p.len;
        })?;
        *store.counters.lock().expect("counters") = counters;
        Ok(store)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn usage(&self) -> NodeUsage {
        let c = *self.counters.lock().expect("counters");
        let fs_free = fs_free_bytes(self.layout.root()).unwrap_or(0);
        let free = if self.capacity_limit > 0 {
            fs_free.min(self.capacity_limit.saturating_sub(c.bytes))
        } else {
            fs_free
        };
        NodeUsage {
            pieces: c.pieces,
            bytes: c.bytes,
            free_bytes: free,
            capacity_bytes: c.bytes.saturating_add(free),
        }
    }

    /// Starts writing a new piece, optionally as a copy of an existing one.
    pub fn begin_write(self: &Arc<Self>, piece: PieceId, base: Option<BasePiece>) -> Result<PieceWriter, StoreError> {
        let (file, temp) = if self.unnamed_temps {
            let root = self.layout.root();
            (
                open_unnamed(root).map_err(io_err("create temporary file in", root))?,
                Temp::Unnamed,
            )
        } else {
            let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
            let tmp_path = self.layout.temp_path(n);
            // A concurrent prune may remove the directory just made: retry.
            let mut attempts = 0;
            let file = loop {
                ensure_parent(&tmp_path, false)?;
                match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp_path)
                {
                    Ok(f) => break f,
                    Err(e) if e.kind() == ErrorKind::NotFound && attempts < 5 => attempts += 1,
                    Err(e) => return Err(io_err("create", &tmp_path)(e)),
                }
            };
            (file, Temp::Named(tmp_path))
        };
        let mut writer = PieceWriter {
            store: self.clone(),
            piece,
            file,
            temp,
            len: 0,
            committed: false,
        };
        if let Some(base) = base {
            writer.copy_base(base)?;
        }
        Ok(writer)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 past the end).
    pub fn read(&self, piece: PieceId, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let file = self.open_piece(piece)?;
        let path = self.layout.piece_path(piece);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read", &path)(e)),
            }
        }
        Ok(done)
    }

    pub fn open_piece(&self, piece: PieceId) -> Result<File, StoreError> {
        let path = self.layout.piece_path(piece);
        File::open(&path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                StoreError::NotFound { piece }
            } else {
                io_err("open", &path)(e)
            }
        })
    }

    pub fn piece_len(&self, piece: PieceId) -> Result<u64, StoreError> {
        let path = self.layout.piece_path(piece);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StoreError::NotFound { piece }),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Deletes a piece and prunes directories it leaves empty. Deleting a missing piece is not
    /// an error (deletes are retried after crashes).
    pub fn delete(&self, piece: PieceId) -> Result<bool, StoreError> {
        let path = self.layout.piece_path(piece);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("delete", &path)(e)),
        }
        {
            let mut c = self.counters.lock().expect("counters");
            c.pieces = c.pieces.saturating_sub(1);
            c.bytes = c.bytes.saturating_sub(len);
        }
        prune_empty_parents(&path, &self.layout.pieces_dir());
        Ok(true)
    }

    /// Every stored piece with its length and age.
    pub fn inventory(&self) -> Result<Vec<StoredPiece>, StoreError> {
        let mut out = Vec::new();
        self.walk(&mut |p| out.push(p))?;
        out.sort_by_key(|p| p.piece);
        Ok(out)
    }

    fn walk(&self, visit: &mut dyn FnMut(StoredPiece)) -> Result<(), StoreError> {
        let base = self.layout.pieces_dir();
        let now = SystemTime::now();
        let mut stack = vec![base.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                // Pruned by a concurrent delete.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("list", &dir))?;
                let path = entry.path();
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("stat", &path)(e)),
                };
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(&base).expect("under base");
                match self.layout.parse_relative(rel) {
                    Some(piece) => visit(StoredPiece {
                        piece,
                        len: meta.len(),
                        age_secs: meta
                            .modified()
                            .ok()
                            .and_then(|m| now.duration_since(m).ok())
                            .map_or(0, |d| d.as_secs()),
                    }),
                    None => tracing::warn!("ignoring stray file {} in the pieces tree", path.display()),
                }
            }
        }
        Ok(())
    }

    fn account_new_piece(&self, len: u64, replaced: Option<u64>) {
        let mut c = self.counters.lock().expect("counters");
        match replaced {
            Some(old) => c.bytes = c.bytes.saturating_sub(old) + len,
            None => {
                c.pieces += 1;
                c.bytes += len;
            }
        }
    }

    fn check_space(&self, piece: PieceId, extra: u64) -> Result<(), StoreError> {
        if self.capacity_limit > 0 {
            let used = self.counters.lock().expect("counters").bytes;
            if used.saturating_add(extra) > self.capacity_limit {
                return Err(StoreError::NoSpace {
                    piece,
                    reason: format!("capacity limit of {} bytes reached", self.capacity_limit),
                });
            }
        }
        Ok(())
    }
}

/// Where an uncommitted piece's bytes live.
enum Temp {
    /// An O_TMPFILE inode: it has no name until linked into place, and vanishes if abandoned.
    Unnamed,
    /// A named file in the `tmp/` tree.
    Named(PathBuf),
}

/// A piece being written into a temporary file; discarded unless committed.
pub struct PieceWriter {
    store: Arc<PieceStore>,
    piece: PieceId,
    file: File,
    temp: Temp,
    len: u64,
    committed: bool,
}

impl PieceWriter {
    fn copy_base(&mut self, base: BasePiece) -> Result<(), StoreError> {
        if base.len > dfs_proto::storage::MAX_PIECE_SIZE {
            return Err(StoreError::Io {
                op: "copy base of",
                path: self.store.layout.piece_path(self.piece),
                source: io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("base length {} is beyond any piece", base.len),
                ),
            });
        }
        let src = self.store.open_piece(base.piece)?;
        let src_path = self.store.layout.piece_path(base.piece);
        let available = src.metadata().map_err(io_err("stat", &src_path))?.len();
        let want = base.len.min(available);
        if want < base.len {
            tracing::warn!(
                "base piece {} holds {available} bytes, fewer than the {} expected; the rest reads as zeros",
                base.piece,
                base.len
            );
        }
        self.store.check_space(self.piece, want)?;
        let mut copied = 0u64;
        let (src_fd, dst_fd) = (src.as_raw_fd(), self.file.as_raw_fd());
        while copied < want {
            let mut off_in = copied as libc::loff_t;
            let mut off_out = copied as libc::loff_t;
            // SAFETY: both fds are open for the duration of the call; offsets are local.
            let n = unsafe {
                libc::copy_file_range(src_fd, &mut off_in, dst_fd, &mut off_out, (want - copied) as usize, 0)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.map_write_error("copy", e));
            }
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        if want < base.len {
            self.file
                .set_len(base.len)
                .map_err(|e| self.map_write_error("extend", e))?;
        }
        self.len = base.len;
        Ok(())
    }

    fn map_write_error(&self, op: &'static str, e: io::Error) -> StoreError {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            StoreError::NoSpace {
                piece: self.piece,
                reason: e.to_string(),
            }
        } else {
            io_err(op, &self.store.layout.piece_path(self.piece))(e)
        }
    }

    pub fn piece(&self) -> PieceId {
        self.piece
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let end = offset + data.len() as u64;
        if end > self.len {
            self.store.check_space(self.piece, end - self.len)?;
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.map_write_error("write", e))?;
        self.len = self.len.max(end);
        Ok(())
    }

    /// Makes the piece durable under its final name and returns its length.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        self.file.sync_all().map_err(|e| self.map_write_error("fsync", e))?;
        let final_path = self.store.layout.piece_path(self.piece);
        let replaced = fs::metadata(&final_path).ok().map(|m| m.len());
        // A concurrent delete may prune the directory between creating and linking: retry.
        let mut attempts = 0;
        loop {
            ensure_parent(&final_path, true)?;
            let placed = match &self.temp {
                Temp::Unnamed => link_into_place(&self.file, &final_path),
                Temp::Named(tmp) => fs::rename(tmp, &final_path),
            };
            match placed {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound && attempts < 5 => attempts += 1,
                Err(e) => return Err(io_err("put into place", &final_path)(e)),
            }
        }
        self.committed = true;
        sync_dir(final_path.parent().expect("piece has a parent"))?;
        self.store.account_new_piece(self.len, replaced);
        if let Temp::Named(tmp) = &self.temp {
            prune_empty_parents(tmp, &self.store.layout.tmp_dir());
        }
        Ok(self.len)
    }
}

impl Drop for PieceWriter {
    fn drop(&mut self) {
        if let (false, Temp::Named(tmp)) = (self.committed, &self.temp) {
            let _ = fs::remove_file(tmp);
            prune_empty_parents(tmp, &self.store.layout.tmp_dir());
        }
    }
}

/// Opens an unnamed temporary file on the file system of `dir`.
fn open_unnamed(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// Gives an unnamed temporary file its final name (replacing a leftover of the same piece).
fn link_into_place(file: &File, path: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let to = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    for _ in 0..2 {
        // SAFETY: valid NUL-terminated paths; AT_SYMLINK_FOLLOW resolves the /proc link to the
        // open file (no capability needed, unlike AT_EMPTY_PATH).
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::AlreadyExists {
            return Err(e);
        }
        // A rewrite of the same piece id (a retried write): the new content wins.
        fs::remove_file(path)?;
    }
    Err(io::Error::from(ErrorKind::AlreadyExists))
}

/// Checks that unnamed temporary files can be created and linked here.
fn probe_unnamed_temps(root: &Path) -> io::Result<()> {
    let file = open_unnamed(root)?;
    let probe = root.join(".tmpfile-probe");
    let _ = fs::remove_file(&probe);
    link_into_place(&file, &probe)?;
    fs::remove_file(&probe)
}

/// Creates the parent directories of `path`; with `durable`, fsyncs the parent of each new one.
fn ensure_parent(path: &Path, durable: bool) -> Result<(), StoreError> {
    let parent = path.parent().expect("path has a parent");
    if parent.is_dir() {
        return Ok(());
    }
    let mut missing = vec![];
    let mut p = parent;
    while !p.is_dir() {
        missing.push(p);
        p = p.parent().expect("data dir exists");
    }
    for dir in missing.into_iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => {
                if durable {
                    sync_dir(dir.parent().expect("has parent"))?;
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create directory", dir)(e)),
        }
    }
    Ok(())
}

/// Removes now-empty directories from `path`'s parent up to (not including) `stop`.
fn prune_empty_parents(path: &Path, stop: &Path) {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == stop || !d.starts_with(stop) {
            break;
        }
        // Fails (harmlessly) as soon as a directory still has entries.
        if fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

fn fs_free_bytes(path: &Path) -> io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded and initialised the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_entries(dir: &Path) -> usize {
        let mut max = 0;
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            let entries: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap()).collect();
            max = max.max(entries.len());
            for e in entries {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        max
    }

    #[test]
    fn write_read_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let mut w = store.begin_write(42, None).unwrap();
        w.write_at(0, b"hello ").unwrap();
        w.write_at(6, b"world").unwrap();
        assert_eq!(w.commit().unwrap(), 11);
        let mut buf = [0u8; 32];
        let n = store.read(42, 6, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"world");
        assert_eq!(store.usage().pieces, 1);
        assert_eq!(store.usage().bytes, 11);
        assert!(store.delete(42).unwrap());
        assert!(!store.delete(42).unwrap());
        assert!(matches!(
            store.read(42, 0, &mut buf),
            Err(StoreError::NotFound { piece: 42 })
        ));
        assert_eq!(store.usage().pieces, 0);
        // Deleting the only piece pruned its directories.
        assert_eq!(fs::read_dir(store.layout().pieces_dir()).unwrap().count(), 0);
    }

    #[test]
    fn copy_on_write_from_base() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let mut w = store.begin_write(1, None).unwrap();
        w.write_at(0, b"abcdefgh").unwrap();
        w.commit().unwrap();
        let mut w = store.begin_write(2, Some(BasePiece { piece: 1, len: 6 })).unwrap();
        w.write_at(2, b"XY").unwrap();
        assert_eq!(w.commit().unwrap(), 6);
        let mut buf = [0u8; 16];
        let n = store.read(2, 0, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"abXYef");
    }

    #[test]
    fn uncommitted_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let mut w = store.begin_write(9, None).unwrap();
        w.write_at(0, b"lost").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(store.layout().tmp_dir()).unwrap().count(), 0);
        assert!(store.inventory().unwrap().is_empty());
        assert_eq!(crate::layout::LOCK_FILE, "lock");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "only pieces/, tmp/ and the lock file: {names:?}");
    }

    #[test]
    fn thousands_of_pieces_keep_directories_small_and_are_counted_again_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
            for id in (0..3000u64).map(|i| i * 7 + 1) {
                let mut w = store.begin_write(id, None).unwrap();
                w.write_at(0, &id.to_le_bytes()).unwrap();
                w.commit().unwrap();
            }
            for id in (0..3000u64).filter(|i| i % 3 == 0).map(|i| i * 7 + 1) {
                store.delete(id).unwrap();
            }
            assert!(max_entries(dir.path()) <= 36);
        }
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        assert_eq!(store.usage().pieces, 2000);
        assert_eq!(store.usage().bytes, 2000 * 8);
        let inv = store.inventory().unwrap();
        assert_eq!(inv.len(), 2000);
        assert_eq!(inv[0].piece, 8);
    }

    #[test]
    fn named_temporary_files_work_where_o_tmpfile_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open_with(dir.path(), 36, 0, false).unwrap());
        assert!(!store.unnamed_temps);
        let mut w = store.begin_write(5, None).unwrap();
        w.write_at(0, b"named").unwrap();
        assert_eq!(count_entries(&store.layout().tmp_dir()), 1);
        w.commit().unwrap();
        assert_eq!(count_entries(&store.layout().tmp_dir()), 0, "temporaries are pruned");
        let mut buf = [0u8; 8];
        let n = store.read(5, 0, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"named");
        let mut w = store.begin_write(6, None).unwrap();
        w.write_at(0, b"abandoned").unwrap();
        drop(w);
        assert_eq!(count_entries(&store.layout().tmp_dir()), 0);
    }

    /// Files (not directories) anywhere under `dir`.
    fn count_entries(dir: &Path) -> usize {
        let mut n = 0;
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn second_daemon_on_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = PieceStore::open(dir.path(), 36, 0).unwrap();
        assert!(matches!(
            PieceStore::open(dir.path(), 36, 0),
            Err(StoreError::Locked { .. })
        ));
    }

    #[test]
    fn capacity_limit_gives_no_space() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 10).unwrap());
        let mut w = store.begin_write(1, None).unwrap();
        assert!(matches!(w.write_at(0, &[0u8; 11]), Err(StoreError::NoSpace { .. })));
    }
}
