//! The piece store: durable writes, ranged reads and deletes of pieces under a data directory.
//!
//! All functions here block; the server calls them from tokio's blocking pool.
//! A write is visible (and acknowledged) only once it is durable: data written to a temporary
//! file, the file fsync'd, linked (or renamed) into place, and the directory fsync'd.
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

use crate::layout::{LOCK_FILE, Layout};
use crate::piece_format::{self, BLOCK_SIZE, FormatError, Trailer};

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
            StoreError::Io { .. } | StoreError::Locked { .. } => WireKind::Io,
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

/// Opens a directory and fsyncs it, making its entries durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Bytes a piece file of `file_len` bytes counts for: its data length, or for a file whose
/// length fits no piece (damaged), its size. Adding and removing a piece use the same figure.
fn accounted_len(file_len: u64) -> u64 {
    piece_format::data_len_from_file_len(file_len).unwrap_or(file_len)
}

/// Pieces found corrupt and not yet handed to membership for reporting.
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
    next_temp: AtomicU64,
    counters: Mutex<Counters>,
    corrupt: Arc<CorruptSet>,
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
            corrupt: Arc::new(CorruptSet::default()),
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
        let tail_len = Trailer::tail_len(file_len).map_err(|e| reader.corrupt(e, file_len))?;
        let mut tail = vec![0u8; tail_len as usize];
        match reader.file.read_exact_at(&mut tail, file_len - tail_len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(reader.corrupt(FormatError::BadFileLength { file_len }, file_len));
            }
            Err(e) => return Err(io_err("read trailer of", &reader.path)(e)),
        }
        let trailer = Trailer::decode(file_len, &tail).map_err(|e| reader.corrupt(e, file_len))?;
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

/// An open piece whose trailer checked out; every read verifies the blocks it touches.
pub struct PieceReader {
    piece: PieceId,
    path: PathBuf,
    file: File,
    /// Set once decoded (always, for a reader handed out).
    trailer: Option<Trailer>,
    /// Where corruption found is recorded (None: the caller does not want it reported).
    corrupt: Option<Arc<CorruptSet>>,
}

impl PieceReader {
    fn trailer(&self) -> &Trailer {
        self.trailer
            .as_ref()
            .expect("readers are handed out with their trailer")
    }

    pub fn piece(&self) -> PieceId {
        self.piece
    }

    /// Data length.
    pub fn len(&self) -> u64 {
        self.trailer().data_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn block_count(&self) -> u64 {
        self.trailer().block_count()
    }

    /// Logs and records damage found at `offset`, and makes the error for it.
    fn corrupt(&self, reason: FormatError, offset: u64) -> StoreError {
        let err = StoreError::Corrupt {
            piece: self.piece,
            path: self.path.clone(),
            offset,
            reason,
        };
        if let Some(set) = &self.corrupt {
            tracing::error!("{err}");
            set.insert(self.piece);
        }
        err
    }

    /// Reads whole blocks starting with `first` into `buf` (exactly their bytes) and checks them.
    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let offset = first * BLOCK_SIZE;
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(self.corrupt(FormatError::ShortBlock { block: first, offset }, offset));
            }
            Err(e) => return Err(io_err("read", &self.path)(e)),
        }
        self.trailer().check_blocks(first, buf).map_err(|e| {
            let at = e.offset(offset);
            self.corrupt(e, at)
        })
    }

    /// Reads up to `buf.len()` bytes at `offset` (0 past the end), verifying every block the
    /// range touches. Whole blocks are read straight into `buf`; partial ones through a
    /// one-block buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let len = self.len();
        if offset >= len || buf.is_empty() {
            return Ok(0);
        }
        let end = len.min(offset.saturating_add(buf.len() as u64));
        // Whole blocks inside [offset, end) end here (the piece's partial last block counts
        // as whole when the range reaches the end of the piece).
        let whole_end = if end == len { len } else { end / BLOCK_SIZE * BLOCK_SIZE };
        let mut scratch = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let (block_start, block_end) = self.trailer().block_range(block);
            let out = (pos - offset) as usize;
            if pos == block_start && block_end <= whole_end {
                let n = (whole_end - pos) as usize;
                self.read_blocks(block, &mut buf[out..out + n])?;
                pos = whole_end;
            } else {
                scratch.resize((block_end - block_start) as usize, 0);
                self.read_blocks(block, &mut scratch)?;
                let take = (block_end.min(end) - pos) as usize;
                let from = (pos - block_start) as usize;
                buf[out..out + take].copy_from_slice(&scratch[from..from + take]);
                pos += take as u64;
            }
        }
        Ok((end - offset) as usize)
    }

    /// Fills `buf` from `offset`; fails if the piece ends first.
    pub fn read_exact(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let n = self.read(offset, buf)?;
        if n < buf.len() {
            return Err(io_err("read", &self.path)(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "piece {} holds {} bytes, read of {} at {offset} runs past it",
                    self.piece,
                    self.len(),
                    buf.len()
                ),
            )));
        }
        Ok(())
    }

    /// Verifies up to `count` blocks from `first` (scrubbing); returns the data bytes checked.
    pub fn verify_blocks(&self, first: u64, count: u64) -> Result<u64, StoreError> {
        let last = (first + count).min(self.block_count());
        if first >= last {
            return Ok(0);
        }
        let start = first * BLOCK_SIZE;
        let end = self.trailer().block_range(last - 1).1;
        let mut buf = vec![0u8; (end - start) as usize];
        self.read_blocks(first, &mut buf)?;
        Ok(end - start)
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
        // Verified as it is copied: a damaged base fails this write (and is reported) rather
        // than being blessed with fresh checksums.
        let src = self.store.open_reader(base.piece)?;
        let available = src.len();
        let want = base.len.min(available);
        if want < base.len {
            tracing::warn!(
                "base piece {} holds {available} bytes, fewer than the {} expected; the rest reads as zeros",
                base.piece,
                base.len
            );
        }
        self.store.check_space(self.piece, want)?;
        let mut buf = vec![0u8; (want as usize).min(IO_CHUNK)];
        let mut copied = 0u64;
        while copied < want {
            let n = ((want - copied) as usize).min(buf.len());
            src.read_exact(copied, &mut buf[..n])?;
            self.file
                .write_all_at(&buf[..n], copied)
                .map_err(|e| self.map_write_error("copy", e))?;
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

    /// Appends the checksum trailer, computed over the final data read back (segments may have
    /// come in any order, so only now is every block complete).
    fn write_trailer(&self) -> Result<(), StoreError> {
        let mut crcs = Vec::with_capacity(piece_format::block_count(self.len) as usize);
        let mut buf = vec![0u8; (self.len as usize).min(IO_CHUNK)];
        let mut pos = 0u64;
        while pos < self.len {
            let n = ((self.len - pos) as usize).min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(|e| self.map_write_error("read back", e))?;
            crcs.extend(buf[..n].chunks(BLOCK_SIZE as usize).map(piece_format::block_crc));
            pos += n as u64;
        }
        let trailer = piece_format::encode_trailer(self.len, &crcs);
        self.file
            .write_all_at(&trailer, self.len)
            .map_err(|e| self.map_write_error("write checksums", e))
    }

    /// Writes the checksums, makes the piece durable under its final name and returns its
    /// (data) length.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        self.write_trailer()?;
        self.file.sync_all().map_err(|e| self.map_write_error("fsync", e))?;
        let final_path = self.store.layout.piece_path(self.piece);
        let replaced = fs::metadata(&final_path).ok().map(|m| accounted_len(m.len()));
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
        // A damaged copy this one replaced is gone.
        self.store.corrupt.remove(self.piece);
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

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
            .collect()
    }

    fn store_with(dir: &Path, piece: PieceId, data: &[u8]) -> Arc<PieceStore> {
        let store = Arc::new(PieceStore::open(dir, 36, 0).unwrap());
        put(&store, piece, data);
        store
    }

    fn put(store: &Arc<PieceStore>, piece: PieceId, data: &[u8]) {
        let mut w = store.begin_write(piece, None).unwrap();
        w.write_at(0, data).unwrap();
        assert_eq!(w.commit().unwrap(), data.len() as u64);
    }

    /// XORs one byte of a piece file at `offset` (from the end when negative).
    fn flip_byte(store: &PieceStore, piece: PieceId, offset: i64) {
        let path = store.layout().piece_path(piece);
        let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let at = if offset < 0 {
            f.metadata().unwrap().len() - offset.unsigned_abs()
        } else {
            offset as u64
        };
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    }

    const B: usize = BLOCK_SIZE as usize;

    #[test]
    fn lengths_are_data_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let len = 2 * B + 123;
        let store = store_with(dir.path(), 7, &pattern(len, 1));
        let file_size = fs::metadata(store.layout().piece_path(7)).unwrap().len();
        assert_eq!(file_size, piece_format::file_len(len as u64));
        assert!(file_size > len as u64);
        assert_eq!(store.piece_len(7).unwrap(), len as u64);
        assert_eq!(store.usage().bytes, len as u64);
        assert_eq!(store.inventory().unwrap()[0].len, len as u64);
        // Rewriting the same piece replaces its bytes in the count; reopening counts the same.
        put(&store, 7, &pattern(10, 2));
        assert_eq!((store.usage().pieces, store.usage().bytes), (1, 10));
        drop(store);
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        assert_eq!((store.usage().pieces, store.usage().bytes), (1, 10));
        assert!(store.delete(7).unwrap());
        assert_eq!((store.usage().pieces, store.usage().bytes), (0, 0));
        // An empty piece is a piece of 0 bytes.
        put(&store, 8, b"");
        assert_eq!(store.piece_len(8).unwrap(), 0);
        assert_eq!(store.read(8, 0, &mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    fn out_of_order_segments_read_back_over_any_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let data = pattern(3 * B + 500, 3);
        let mut w = store.begin_write(1, None).unwrap();
        // Back to front, in uneven segments straddling block boundaries.
        let cuts = [0, 1000, B + 7, 2 * B, 3 * B + 1, data.len()];
        for pair in cuts.windows(2).rev() {
            w.write_at(pair[0] as u64, &data[pair[0]..pair[1]]).unwrap();
        }
        assert_eq!(w.commit().unwrap(), data.len() as u64);
        let reader = store.open_reader(1).unwrap();
        for (offset, len) in [
            (0, data.len()),
            (0, B),
            (1, B),
            (B - 1, 2),
            (B, 2 * B),
            (100, 3 * B),
            (3 * B, 500),
            (3 * B + 499, 10),
            (data.len() - 1, 1),
            (7, 5),
        ] {
            let mut buf = vec![0u8; len];
            let n = reader.read(offset as u64, &mut buf).unwrap();
            let end = (offset + len).min(data.len());
            assert_eq!(n, end - offset, "read {offset}+{len}");
            assert_eq!(&buf[..n], &data[offset..end], "read {offset}+{len}");
        }
        assert_eq!(reader.read(data.len() as u64, &mut [0u8; 8]).unwrap(), 0);
        assert_eq!(reader.read(u64::MAX, &mut [0u8; 8]).unwrap(), 0);
        assert!(store.take_corrupt().is_empty());
    }

    #[test]
    fn damaged_data_byte_is_detected_on_read_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3 * B, 4);
        let store = store_with(dir.path(), 11, &data);
        flip_byte(&store, 11, (B + 10) as i64);
        let mut buf = vec![0u8; 100];
        // Blocks the read does not touch still read fine.
        assert_eq!(store.read(11, 0, &mut buf).unwrap(), 100);
        assert_eq!(store.read(11, 2 * B as u64, &mut buf).unwrap(), 100);
        assert!(store.take_corrupt().is_empty());
        // Any read touching block 1 fails, even one not covering the damaged byte.
        let err = store.read(11, B as u64 - 50, &mut buf).unwrap_err();
        match &err {
            StoreError::Corrupt {
                piece: 11,
                offset,
                reason: FormatError::BlockChecksum { block: 1, .. },
                ..
            } => assert_eq!(*offset, B as u64),
            other => panic!("expected corruption in block 1, got {other:?}"),
        }
        assert_eq!(err.to_remote().kind, WireKind::Corrupt);
        assert!(matches!(
            store.read(11, 2 * B as u64 - 1, &mut buf),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(store.take_corrupt(), vec![11], "reported once");
        assert!(store.take_corrupt().is_empty());
        // Checking without reporting (the copier, about to replace it) sees it too.
        assert!(matches!(store.verified_len(11), Err(StoreError::Corrupt { .. })));
        assert!(store.take_corrupt().is_empty());
        // A fresh copy replaces it.
        store.read(11, B as u64, &mut buf).unwrap_err();
        put(&store, 11, &data);
        assert!(store.take_corrupt().is_empty(), "the damaged copy is gone");
        assert_eq!(store.verified_len(11).unwrap(), data.len() as u64);
    }

    #[test]
    fn garbled_or_missing_trailer_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(B + 10, 5);
        let store = store_with(dir.path(), 1, &data);
        put(&store, 2, &data);
        put(&store, 3, &data);
        put(&store, 4, &data);
        flip_byte(&store, 1, -1); // footer checksum
        flip_byte(&store, 2, -20); // footer data length
        flip_byte(&store, 3, data.len() as i64); // crc of block 0
        // Piece 4 loses its trailer altogether.
        let f = OpenOptions::new()
            .write(true)
            .open(store.layout().piece_path(4))
            .unwrap();
        f.set_len(data.len() as u64).unwrap();
        let mut buf = [0u8; 16];
        for piece in 1..=4 {
            assert!(
                matches!(store.read(piece, 0, &mut buf), Err(StoreError::Corrupt { piece: p, .. }) if p == piece),
                "piece {piece}"
            );
        }
        assert!(matches!(store.piece_len(1), Err(StoreError::Corrupt { .. })));
        assert_eq!(store.take_corrupt(), vec![1, 2, 3, 4]);
        // Damaged files still list, and deleting them keeps the counts right (counted afresh:
        // truncating a file behind the store's back changes what it counts for).
        drop(store);
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        assert_eq!(store.inventory().unwrap().len(), 4);
        for piece in 1..=4 {
            assert!(store.delete(piece).unwrap());
        }
        assert_eq!((store.usage().pieces, store.usage().bytes), (0, 0));
    }

    #[test]
    fn copy_from_base_verifies_what_it_copies() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3 * B, 6);
        let store = store_with(dir.path(), 1, &data);
        // Copying the first block and part of the second, with a new last byte.
        let mut w = store
            .begin_write(
                2,
                Some(BasePiece {
                    piece: 1,
                    len: B as u64 + 9,
                }),
            )
            .unwrap();
        w.write_at(B as u64 + 9, b"!").unwrap();
        assert_eq!(w.commit().unwrap(), B as u64 + 10);
        let mut buf = vec![0u8; 2 * B];
        let n = store.read(2, 0, &mut buf).unwrap();
        assert_eq!(&buf[..n - 1], &data[..B + 9]);
        assert_eq!(buf[n - 1], b'!');
        // A base with damage in a block the copy reads (block 1, past the copied bytes but in
        // the block they end in) fails the write and is reported.
        flip_byte(&store, 1, (B + 100) as i64);
        let result = store.begin_write(
            3,
            Some(BasePiece {
                piece: 1,
                len: B as u64 + 9,
            }),
        );
        assert!(matches!(result, Err(StoreError::Corrupt { piece: 1, .. })));
        assert_eq!(store.take_corrupt(), vec![1]);
        assert!(matches!(store.read(3, 0, &mut buf), Err(StoreError::NotFound { .. })));
        // Damage beyond the copied range does not matter to the copy.
        let mut w = store.begin_write(4, Some(BasePiece { piece: 1, len: 100 })).unwrap();
        w.write_at(0, b"x").unwrap();
        assert_eq!(w.commit().unwrap(), 100);
        // A base with a garbled trailer cannot be copied at all.
        flip_byte(&store, 2, -3);
        assert!(matches!(
            store.begin_write(5, Some(BasePiece { piece: 2, len: 10 })),
            Err(StoreError::Corrupt { piece: 2, .. })
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
