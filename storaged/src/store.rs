//! The piece store: durable writes, ranged reads and deletes of pieces under a data directory.
//!
//! All functions here block; the server calls them from tokio's blocking pool.
//! A write is acknowledged only once it is durable: data written to a temporary file, then
//! either (a new small piece) linked into place and its bytes appended to the fdatasync'd piece
//! journal (`journal.rs`, checkpointed into the files by `syncfs`), or the file fsync'd,
//! linked (or renamed) into place, and the directory fsync'd.
//!
//! Every piece file carries a CRC32C per 64 KiB block after its data (`piece_format.rs`). Reads
//! verify the blocks they touch; a mismatch fails the read with [`StoreError::Corrupt`], is
//! logged, and the piece is remembered until membership reports it ([`PieceStore::take_corrupt`]).
//! Lengths reported anywhere (writes, inventory, usage) are data lengths, not file sizes.
//!
//! Temporary files are unnamed (`O_TMPFILE`) where the file system supports it: they have no
//! directory entry until they are complete, and an abandoned write leaves nothing behind.
//! Elsewhere they are named files in the `tmp/` tree (which also keeps to the fanout).

use std::collections::BTreeSet;
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

use crate::layout::{LOCK_FILE, Layout, Marker};
use crate::piece_format::{self, BLOCK_SIZE, Footer, FormatError, Trailer};

pub mod journal;
mod reader;
mod temp_pool;
mod writer;

pub use reader::PieceReader;
pub use writer::{OpenBase, PieceWriter};
use writer::{Temp, open_unnamed, probe_unnamed_temps};

/// Reads and copies move this much at a time (a whole number of checksum blocks).
const IO_CHUNK: usize = 16 * BLOCK_SIZE as usize;

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
    #[error(
        "data directory {dir} was laid out with fanout {recorded}, but fanout {configured} is configured: \
         its pieces would be looked for under the wrong names. Set fanout = {recorded} for this daemon"
    )]
    FanoutMismatch {
        dir: PathBuf,
        recorded: u32,
        configured: u32,
    },
    #[error("data directory {dir}: its layout marker {path} is unusable: {reason}")]
    BadMarker {
        dir: PathBuf,
        path: PathBuf,
        reason: String,
    },
    #[error("piece {piece} ({path}) is corrupt at offset {offset}: {reason}")]
    Corrupt {
        piece: PieceId,
        path: PathBuf,
        offset: u64,
        #[source]
        reason: FormatError,
    },
}

impl StoreError {
    pub fn to_remote(&self) -> RemoteError {
        let kind = match self {
            StoreError::NotFound { .. } => WireKind::NotFound,
            StoreError::NoSpace { .. } => WireKind::NoSpace,
            StoreError::Io { .. }
            | StoreError::Locked { .. }
            | StoreError::FanoutMismatch { .. }
            | StoreError::BadMarker { .. } => WireKind::Io,
            StoreError::Corrupt { .. } => WireKind::Corrupt,
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

/// Checks that the data directory was laid out with `fanout`, recording it in a new one.
fn check_layout_marker(root: &Path, fanout: u32) -> Result<(), StoreError> {
    let path = root.join(crate::layout::MARKER_FILE);
    match fs::read(&path) {
        Ok(text) => {
            let marker = Marker::decode(&text).map_err(|reason| StoreError::BadMarker {
                dir: root.to_owned(),
                path: path.clone(),
                reason,
            })?;
            if marker.fanout != fanout {
                return Err(StoreError::FanoutMismatch {
                    dir: root.to_owned(),
                    recorded: marker.fanout,
                    configured: fanout,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let pieces = root.join(crate::layout::PIECES_DIR);
            let has_pieces = fs::read_dir(&pieces).is_ok_and(|mut d| d.next().is_some());
            if has_pieces {
                tracing::warn!(
                    "data directory {} has pieces but no layout marker (written by an older dfs-storaged): \
                     recording the configured fanout {fanout}",
                    root.display()
                );
            }
            let marker = Marker {
                format: crate::layout::DIR_FORMAT,
                fanout,
            };
            let new = root.join(format!("{}.new", crate::layout::MARKER_FILE));
            let write = || -> io::Result<()> {
                let mut f = File::create(&new)?;
                io::Write::write_all(&mut f, marker.encode().as_bytes())?;
                f.sync_all()?;
                fs::rename(&new, &path)
            };
            write().map_err(io_err("write", &path))?;
            sync_dir(root)
        }
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Opens a directory and fsyncs it, making its entries durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    sync_dir_io(dir).map_err(io_err("fsync directory", dir))
}

fn sync_dir_io(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Bytes a piece file of `file_len` bytes counts for: its data length, or for a file whose
/// length fits no piece (damaged), its size. Adding and removing a piece use the same figure.
fn accounted_len(file_len: u64) -> u64 {
    piece_format::data_len_from_file_len(file_len).unwrap_or(file_len)
}

/// Pieces found corrupt (or missing) and not yet handed to membership for reporting.
#[derive(Debug, Default)]
struct CorruptSet(Mutex<BTreeSet<PieceId>>);

impl CorruptSet {
    fn insert(&self, piece: PieceId) {
        self.0.lock().expect("corrupt set").insert(piece);
    }

    fn remove(&self, piece: PieceId) {
        self.0.lock().expect("corrupt set").remove(&piece);
    }

    fn take(&self) -> Vec<PieceId> {
        std::mem::take(&mut *self.0.lock().expect("corrupt set"))
            .into_iter()
            .collect()
    }
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
    /// Unnamed temporary files made ahead (with `unnamed_temps`).
    temps: Option<Arc<temp_pool::TempPool>>,
    next_temp: AtomicU64,
    counters: Mutex<Counters>,
    corrupt: Arc<CorruptSet>,
    /// Pieces asked for (or to be checked) and found absent, until membership reports them.
    missing: CorruptSet,
    /// New small pieces are made durable here (`journal.rs`); stopped before the lock goes.
    journal: Option<journal::Journal>,
    // Held for the life of the store: a second daemon on the same directory is refused.
    _lock: File,
}

impl PieceStore {
    /// Opens (creating if needed) a data directory, removes leftovers of interrupted writes and
    /// counts what is stored.
    pub fn open(root: &Path, fanout: u32, capacity_limit: u64) -> Result<Self, StoreError> {
        Self::open_with(root, fanout, capacity_limit, true, Some(journal::DEFAULT_FILE_SIZE))
    }

    /// Like [`open`](Self::open), with the piece journal only if `journal` (the records a
    /// journal left are replayed either way).
    pub fn open_with_journal(root: &Path, fanout: u32, capacity_limit: u64, journal: bool) -> Result<Self, StoreError> {
        let size = journal.then_some(journal::DEFAULT_FILE_SIZE);
        Self::open_with(root, fanout, capacity_limit, true, size)
    }

    fn open_with(
        root: &Path,
        fanout: u32,
        capacity_limit: u64,
        allow_unnamed: bool,
        journal_size: Option<u64>,
    ) -> Result<Self, StoreError> {
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
        check_layout_marker(root, fanout)?;
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
        let mut store = PieceStore {
            layout,
            capacity_limit,
            unnamed_temps,
            temps: unnamed_temps.then(|| temp_pool::TempPool::start(root.to_path_buf())),
            next_temp: AtomicU64::new(0),
            counters: Mutex::new(Counters::default()),
            corrupt: Arc::new(CorruptSet::default()),
            missing: CorruptSet::default(),
            journal: None,
            _lock: lock,
        };
        store.replay_journal()?;
        match journal_size {
            Some(size) => {
                let started =
                    journal::Journal::start(root, size).map_err(io_err("start the piece journal in", root))?;
                store.journal = Some(started);
            }
            None => {
                for name in journal::JOURNAL_FILES {
                    let path = root.join(name);
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove", &path)(e)),
                    }
                }
            }
        }
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

    /// Writes again, from the journal, every journaled piece whose file a crash left missing
    /// or incomplete, then makes them all durable.
    fn replay_journal(&self) -> Result<(), StoreError> {
        let root = self.layout.root();
        let records = journal::recover(root).map_err(io_err("read the piece journal in", root))?;
        if records.is_empty() {
            return Ok(());
        }
        // A piece id recorded twice (written again after a delete) comes back as last written.
        let mut newest: std::collections::HashMap<PieceId, &journal::Recovered> = std::collections::HashMap::new();
        for record in &records {
            newest.insert(record.piece, record);
        }
        let mut restored = 0;
        for record in newest.values() {
            if self.restore_piece(record.piece, &record.bytes)? {
                restored += 1;
            }
        }
        let dir = File::open(root).map_err(io_err("open", root))?;
        journal::syncfs(&dir).map_err(io_err("syncfs", root))?;
        tracing::info!(
            "{}: {} pieces in the piece journal, {restored} of them written again from it",
            root.display(),
            records.len()
        );
        Ok(())
    }

    /// Puts a journaled piece's file in place unless a complete one is there; returns whether
    /// it did.
    fn restore_piece(&self, piece: PieceId, bytes: &[u8]) -> Result<bool, StoreError> {
        match self.verified_len(piece) {
            Ok(_) => return Ok(false),
            Err(StoreError::NotFound { .. } | StoreError::Corrupt { .. }) => {}
            // Not known to be lost: never overwritten on a guess (the daemon does not start).
            Err(e) => return Err(e),
        }
        let final_path = self.layout.piece_path(piece);
        let tmp = self.layout.temp_path(self.next_temp.fetch_add(1, Ordering::Relaxed));
        ensure_parent(&tmp, false)?;
        fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        ensure_parent(&final_path, false)?;
        fs::rename(&tmp, &final_path).map_err(io_err("put into place", &final_path))?;
        if let Err(e) = self.verified_len(piece) {
            // The record passed its checksum, so this is no crash's doing: keep nothing wrong.
            tracing::error!("piece {piece}: its journal record is not a valid piece ({e}); dropped");
            let _ = fs::remove_file(&final_path);
            return Ok(false);
        }
        Ok(true)
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

    /// Opens the base of a copy-on-write, so that its bytes outlive a deletion of the base
    /// before the new piece is complete. A base that is not here is remembered as missing
    /// (reported to the metaserver, which checks whether this daemon should have it).
    pub fn open_base(&self, base: BasePiece) -> Result<OpenBase, StoreError> {
        if base.len > dfs_proto::storage::MAX_PIECE_SIZE {
            return Err(StoreError::Io {
                op: "copy base of",
                path: self.layout.piece_path(base.piece),
                source: io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("base length {} is beyond any piece", base.len),
                ),
            });
        }
        let reader = self.open_reader(base.piece)?;
        Ok(OpenBase { base, reader })
    }

    /// Starts writing a new piece, optionally as a copy of an existing one.
    pub fn begin_write(self: &Arc<Self>, piece: PieceId, base: Option<BasePiece>) -> Result<PieceWriter, StoreError> {
        let base = base.map(|b| self.open_base(b)).transpose()?;
        self.begin_write_from(piece, base)
    }

    /// Starts writing a new piece, optionally as a copy of a base opened beforehand.
    pub fn begin_write_from(
        self: &Arc<Self>,
        piece: PieceId,
        base: Option<OpenBase>,
    ) -> Result<PieceWriter, StoreError> {
        let (file, temp) = if self.unnamed_temps {
            let root = self.layout.root();
            let file = match &self.temps {
                Some(pool) => pool.take(),
                None => open_unnamed(root),
            };
            (file.map_err(io_err("create temporary file in", root))?, Temp::Unnamed)
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

    /// Reads up to `buf.len()` bytes at `offset`, verifying the checksums of every block the
    /// range touches; returns how many were read (0 past the end).
    pub fn read(&self, piece: PieceId, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        self.open_reader(piece)?.read(offset, buf)
    }

    /// Opens a piece for verified reads. A missing or damaged trailer is corruption: logged,
    /// remembered for reporting, and answered with [`StoreError::Corrupt`].
    pub fn open_reader(&self, piece: PieceId) -> Result<PieceReader, StoreError> {
        self.open_reader_with(piece, true)
    }

    fn open_reader_with(&self, piece: PieceId, report: bool) -> Result<PieceReader, StoreError> {
        let path = self.layout.piece_path(piece);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                StoreError::NotFound { piece }
            } else {
                io_err("open", &path)(e)
            }
        })?;
        let file_len = file.metadata().map_err(io_err("stat", &path))?.len();
        let mut reader = PieceReader {
            piece,
            path,
            file,
            trailer: None,
            corrupt: report.then(|| self.corrupt.clone()),
        };
        let read_end = |reader: &PieceReader, len: u64| -> Result<Vec<u8>, StoreError> {
            let mut buf = vec![0u8; len as usize];
            match reader.file.read_exact_at(&mut buf, file_len - len) {
                Ok(()) => Ok(buf),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    Err(reader.corrupt(FormatError::BadFileLength { file_len }, file_len))
                }
                Err(e) => Err(io_err("read trailer of", &reader.path)(e)),
            }
        };
        let end = read_end(&reader, file_len.min(piece_format::MAX_FOOTER_LEN))?;
        let footer = Footer::find(file_len, &end).map_err(|e| reader.corrupt(e, file_len))?;
        let tail = read_end(&reader, footer.tail_len())?;
        let trailer = Trailer::decode(file_len, footer, &tail, piece).map_err(|e| reader.corrupt(e, file_len))?;
        reader.trailer = Some(trailer);
        Ok(reader)
    }

    /// Verifies every block of a piece without reporting damage (the caller is about to
    /// replace it); returns its data length.
    pub fn verified_len(&self, piece: PieceId) -> Result<u64, StoreError> {
        let reader = self.open_reader_with(piece, false)?;
        let mut block = 0;
        while block < reader.block_count() {
            reader.verify_blocks(block, (IO_CHUNK as u64) / BLOCK_SIZE)?;
            block += IO_CHUNK as u64 / BLOCK_SIZE;
        }
        Ok(reader.len())
    }

    /// Pieces found corrupt since the last call (each once, however often it was found).
    pub fn take_corrupt(&self) -> Vec<PieceId> {
        self.corrupt.take()
    }

    /// Remembers that `piece` was asked for and is not here (a reader or a rewrite wanted
    /// it): the metaserver decides whether this daemon should have had it.
    pub fn note_missing(&self, piece: PieceId) {
        self.missing.insert(piece);
    }

    /// Pieces noted missing since the last call.
    pub fn take_missing(&self) -> Vec<PieceId> {
        self.missing.take()
    }

    /// Checks pieces the metaserver believes are here; notes the absent ones as missing and
    /// returns how many were.
    pub fn check_present(&self, pieces: &[PieceId]) -> usize {
        let mut absent = 0;
        for &piece in pieces {
            let path = self.layout.piece_path(piece);
            match fs::symlink_metadata(&path) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    self.note_missing(piece);
                    absent += 1;
                }
                // Not known to be absent: not reported (the next inventory looks again).
                Err(e) => tracing::warn!("cannot check piece {piece} ({}): {e}", path.display()),
            }
        }
        absent
    }

    /// The data length of a piece (its trailer checked, not its blocks).
    pub fn piece_len(&self, piece: PieceId) -> Result<u64, StoreError> {
        Ok(self.open_reader(piece)?.len())
    }

    /// Deletes a piece and prunes directories it leaves empty. Deleting a missing piece is not
    /// an error (deletes are retried after crashes).
    pub fn delete(&self, piece: PieceId) -> Result<bool, StoreError> {
        let path = self.layout.piece_path(piece);
        let len = match fs::metadata(&path) {
            Ok(m) => accounted_len(m.len()),
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

    /// Every stored piece with its data length and age. Lengths come from file sizes (no file is
    /// opened); a damaged file counts its size until a read or scrub reports it.
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
                        len: accounted_len(meta.len()),
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

/// How often a write makes its directories again after concurrent deletes pruned them.
pub(super) const MAX_PRUNE_RETRIES: u32 = 1000;

/// Creates the parent directories of `path`; with `durable`, fsyncs the parent of each new one.
///
/// A concurrent delete may prune a directory this just found or made (it was empty): the walk
/// then starts again, a bounded number of times.
fn ensure_parent(path: &Path, durable: bool) -> Result<(), StoreError> {
    let parent = path.parent().expect("path has a parent");
    let mut attempts = 0;
    loop {
        match create_missing_dirs(parent, durable) {
            Ok(()) => return Ok(()),
            // Each retry means another thread pruned in between: under contention (CI's test
            // threads on one directory) that can happen many times in a row; it ends.
            Err((dir, e)) if e.kind() == ErrorKind::NotFound && attempts < MAX_PRUNE_RETRIES => {
                tracing::debug!("directory {} pruned while being created; retrying", dir.display());
                attempts += 1;
                std::thread::yield_now();
            }
            Err((dir, e)) => return Err(io_err("create directory", &dir)(e)),
        }
    }
}

/// One walk of [`ensure_parent`]: the directory (or its parent, being synced) that failed.
fn create_missing_dirs(parent: &Path, durable: bool) -> Result<(), (PathBuf, io::Error)> {
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
                    let up = dir.parent().expect("has parent");
                    sync_dir_io(up).map_err(|e| (up.to_owned(), e))?;
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err((dir.to_owned(), e)),
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
mod tests;
