//! What this mount knows and holds for one open inode: its size, the locations of its chunks,
//! and the writes not yet committed.
//!
//! Writes are write-behind: each chunk being written has a stream to its storage daemon fed
//! through a bounded queue, so `write()` returns once the data is queued. `flush` (every close,
//! fsync) ends the streams, waits for each daemon to report its piece durable, then commits the
//! new pieces to the metaserver; only then does close() return. Pieces filling empty chunks
//! are committed while the daemons make them durable instead (`Mount::commit_ahead`), and
//! withdrawn if they fail. Until the commit, readers of the file (anywhere) see its previous
//! version: a rewritten chunk is a new piece, copied on write, never an in-place change.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dfs_proto::meta::{Allocation, AttrChanges, CHUNK_WINDOW, ChunkLocation, TimeSet, WrittenPiece};
use dfs_proto::types::Attr;
use dfs_proto::types::{Ino, NodeId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{FsError, FsResult};
use crate::errseq::ErrorSeq;

/// Chunks one inode may stream at once (random writers touch several).
pub const MAX_OPEN_CHUNKS: usize = 4;
/// Finished chunk streams awaiting their durable acknowledgement before new ones wait.
pub const MAX_CLOSING_CHUNKS: usize = 8;
/// Uncommitted pieces after which a commit happens without waiting for close.
pub const COMMIT_EVERY: usize = 32;
/// Segments queued per chunk stream (each up to one FUSE write, 1 MiB).
pub const SEGMENT_QUEUE: usize = 4;
/// A file not written to for this long has its pending writes committed in the background, so
/// no stream to a daemon sits idle (daemons give up on idle streams) and long-lived open files
/// do not hold data uncommitted indefinitely.
pub const IDLE_COMMIT: Duration = Duration::from_secs(10);

pub type Segment = (u64, Bytes);

/// A piece made durable: its length and the daemons holding a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub len: u64,
    pub nodes: Vec<NodeId>,
}

pub struct OpenChunk {
    pub alloc: Allocation,
    /// The daemons a stream of the piece was started to.
    pub nodes: Vec<NodeId>,
    /// End of the furthest byte written into the piece.
    pub end: u64,
    pub tx: mpsc::Sender<Segment>,
    pub task: JoinHandle<FsResult<Stored>>,
    pub last_use: u64,
}

pub struct ClosingChunk {
    pub alloc: Allocation,
    pub nodes: Vec<NodeId>,
    pub end: u64,
    pub task: JoinHandle<FsResult<Stored>>,
}

/// The uncommitted writes of one inode on this mount.
///
/// Every step that waits is cancel-safe: a piece leaves `open`/`closing` only once its outcome
/// is recorded in `done` or `error`, and `done` is cleared only after the metaserver committed.
pub struct Writer {
    pub open: BTreeMap<u64, OpenChunk>,
    pub closing: VecDeque<ClosingChunk>,
    /// Durable pieces not yet committed.
    pub done: Vec<WrittenPiece>,
    /// End of the furthest write since the last commit.
    pub end: u64,
    pub dirty: bool,
    /// A failure found while settling finished streams, until the writer handles it (drops
    /// the uncommitted writes and records it for their writers: `Mount::fail_writes`).
    pub error: Option<FsError>,
    /// A piece the metaserver set aside for chunk 0 when it created the file.
    pub first_piece: Option<Allocation>,
    /// Created by this mount and not committed since: attribute changes wait for the close even
    /// if nothing is written (tar creates empty files, then sets their times, owner and mode).
    pub fresh: bool,
    /// Opened by a `Create`, which the metaserver answers before it is durable: the next close
    /// or fsync makes it durable (`Mount::commit`) even with nothing to commit.
    pub create_unlogged: bool,
    pub clock: u64,
    pub last_write: Instant,
    /// The lock hold the uncommitted writes were made under (the first seen), if any.
    pub fence: Option<dfs_proto::meta::Fence>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer {
            open: BTreeMap::new(),
            closing: VecDeque::new(),
            done: Vec::new(),
            end: 0,
            dirty: false,
            error: None,
            first_piece: None,
            fresh: false,
            create_unlogged: false,
            clock: 0,
            last_write: Instant::now(),
            fence: None,
        }
    }
}

impl Writer {
    /// Nothing written, nothing in flight, no failure waiting to be reported, no create to
    /// make durable: a commit would have nothing to do.
    pub fn is_idle(&self) -> bool {
        !self.dirty
            && self.open.is_empty()
            && self.closing.is_empty()
            && self.done.is_empty()
            && self.error.is_none()
            && !self.create_unlogged
    }

    /// Moves an open chunk to the closing list (its stream ends once its queue drains).
    pub fn close_chunk(&mut self, chunk: u64) {
        if let Some(oc) = self.open.remove(&chunk) {
            drop(oc.tx);
            self.closing.push_back(ClosingChunk {
                alloc: oc.alloc,
                nodes: oc.nodes,
                end: oc.end,
                task: oc.task,
            });
        }
    }

    /// Ends every stream (their pieces finish becoming durable in the background).
    pub fn close_all(&mut self) {
        let open: Vec<u64> = self.open.keys().copied().collect();
        for chunk in open {
            self.close_chunk(chunk);
        }
    }

    /// The pieces still becoming durable, as they will be once they are, if every one of
    /// them is a new piece written from scratch (no base: its length is the end of what was
    /// written, and it fills a chunk that held nothing when it was placed). None otherwise.
    pub fn in_flight_pieces(&self) -> Option<Vec<WrittenPiece>> {
        if self.error.is_some() || self.closing.iter().any(|c| c.alloc.base.is_some()) {
            return None;
        }
        Some(
            self.closing
                .iter()
                .map(|c| WrittenPiece {
                    chunk: c.alloc.chunk,
                    piece: c.alloc.piece,
                    nodes: c.nodes.clone(),
                    len: c.end,
                })
                .collect(),
        )
    }

    /// The open chunk used least recently.
    pub fn least_recent(&self) -> Option<u64> {
        self.open.iter().min_by_key(|(_, oc)| oc.last_use).map(|(&c, _)| c)
    }

    /// Whether `chunk` has a piece that is finished (or finishing) but not committed.
    pub fn has_pending(&self, chunk: u64) -> bool {
        self.closing.iter().any(|c| c.alloc.chunk == chunk) || self.done.iter().any(|p| p.chunk == chunk)
    }

    /// Waits for the oldest closing chunk and records its outcome.
    pub async fn settle_one(&mut self) {
        let Some(front) = self.closing.front_mut() else { return };
        // Awaited in place: if this wait is abandoned, the chunk is still in the list.
        let outcome = match (&mut front.task).await {
            Ok(r) => r,
            Err(e) => Err(FsError::io(format!(
                "piece {} writer task failed: {e}",
                front.alloc.piece
            ))),
        };
        let c = self.closing.pop_front().expect("front exists");
        match outcome {
            Ok(stored) => self.done.push(WrittenPiece {
                chunk: c.alloc.chunk,
                piece: c.alloc.piece,
                nodes: stored.nodes,
                len: stored.len,
            }),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Ends every stream and waits until each piece is durable (or failed).
    pub async fn settle_all(&mut self) {
        self.close_all();
        while !self.closing.is_empty() {
            self.settle_one().await;
        }
    }

    /// Drops every uncommitted write (after its failure has been reported).
    pub fn discard(&mut self) {
        for (_, oc) in std::mem::take(&mut self.open) {
            oc.task.abort();
        }
        for c in std::mem::take(&mut self.closing) {
            c.task.abort();
        }
        self.done.clear();
        self.end = 0;
        self.dirty = false;
        self.fresh = false;
        self.error = None;
        self.fence = None;
    }
}

/// The cached part of an inode: size and chunk locations.
#[derive(Default)]
pub struct Cached {
    pub size: u64,
    pub chunks: HashMap<u64, ChunkLocation>,
    /// Windows (chunk index / CHUNK_WINDOW) whose locations are all in `chunks`.
    pub windows: HashSet<u64>,
}

impl Cached {
    pub fn reset(&mut self, size: u64, first_window: Vec<ChunkLocation>) {
        self.size = size;
        self.chunks = first_window.into_iter().map(|c| (c.chunk, c)).collect();
        self.windows.clear();
        self.windows.insert(0);
    }

    pub fn invalidate(&mut self) {
        self.chunks.clear();
        self.windows.clear();
    }

    pub fn fill(&mut self, window: u64, chunks: Vec<ChunkLocation>) {
        let first = window * CHUNK_WINDOW as u64;
        self.chunks
            .retain(|&c, _| c < first || c >= first + CHUNK_WINDOW as u64);
        for c in chunks {
            self.chunks.insert(c.chunk, c);
        }
        self.windows.insert(window);
    }
}

pub struct InodeState {
    pub ino: Ino,
    /// Handles open on this inode through this mount (changed under the mount's inode map lock).
    pub handles: AtomicU32,
    /// Quick view of uncommitted growth for getattr, without taking the lock.
    dirty: AtomicBool,
    dirty_end: AtomicU64,
    /// Attribute changes made while writes were pending: they travel with the commit.
    held_attrs: std::sync::Mutex<AttrChanges>,
    /// The attributes last received from the metaserver.
    last_attr: std::sync::Mutex<Option<Attr>>,
    pub cache: tokio::sync::Mutex<Cached>,
    pub writer: tokio::sync::Mutex<Writer>,
    /// Write failures, reported to each descriptor open for writing (`errseq`).
    pub errors: ErrorSeq,
    /// The cached size and chunk map may describe writes that were dropped: look again.
    cache_stale: AtomicBool,
}

impl InodeState {
    pub fn new(ino: Ino) -> Self {
        InodeState {
            ino,
            handles: AtomicU32::new(0),
            dirty: AtomicBool::new(false),
            dirty_end: AtomicU64::new(0),
            held_attrs: std::sync::Mutex::new(AttrChanges::default()),
            last_attr: std::sync::Mutex::new(None),
            cache: tokio::sync::Mutex::new(Cached::default()),
            writer: tokio::sync::Mutex::new(Writer::default()),
            errors: ErrorSeq::default(),
            cache_stale: AtomicBool::new(false),
        }
    }

    /// Marks the cache as not to be trusted (it is locked by someone else right now).
    pub fn stale_cache(&self) {
        self.cache_stale.store(true, Ordering::Release);
    }

    /// Whether the cache was marked stale since (clearing the mark).
    pub fn take_stale_cache(&self) -> bool {
        self.cache_stale.swap(false, Ordering::AcqRel)
    }

    pub fn mark_dirty(&self, end: u64) {
        self.dirty_end.fetch_max(end, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
    }

    /// Holds back attribute changes until the pending writes are committed.
    pub fn hold_attrs(&self, changes: &AttrChanges) {
        let mut c = *changes;
        // "Now" is the moment of the call, not of the commit.
        let now = TimeSet::At(dfs_proto::types::Timestamp::now());
        c.atime = c.atime.map(|t| if t == TimeSet::Now { now } else { t });
        c.mtime = c.mtime.map(|t| if t == TimeSet::Now { now } else { t });
        self.held_attrs.lock().expect("held attrs").merge(&c);
    }

    /// A write after a held-back mtime change makes the file's mtime the write's.
    pub fn written(&self) {
        self.held_attrs.lock().expect("held attrs").mtime = None;
    }

    pub fn held_attrs(&self) -> AttrChanges {
        *self.held_attrs.lock().expect("held attrs")
    }

    pub fn clear_held_attrs(&self) {
        *self.held_attrs.lock().expect("held attrs") = AttrChanges::default();
    }

    pub fn remember(&self, attr: &Attr) {
        *self.last_attr.lock().expect("last attr") = Some(*attr);
    }

    pub fn last_attr(&self) -> Option<Attr> {
        *self.last_attr.lock().expect("last attr")
    }

    /// Attributes as an application on this mount should see them: uncommitted growth and
    /// held-back changes included.
    pub fn overlay(&self, mut attr: Attr) -> Attr {
        if !self.is_dirty() {
            return attr;
        }
        attr.size = attr.size.max(self.dirty_end.load(Ordering::Acquire));
        let held = *self.held_attrs.lock().expect("held attrs");
        let at = |t: TimeSet, old| match t {
            TimeSet::At(ts) => ts,
            TimeSet::Now => old,
        };
        attr.perm = held.perm.map(|p| p & 0o7777).unwrap_or(attr.perm);
        attr.uid = held.uid.unwrap_or(attr.uid);
        attr.gid = held.gid.unwrap_or(attr.gid);
        attr.atime = held.atime.map(|t| at(t, attr.atime)).unwrap_or(attr.atime);
        attr.mtime = held.mtime.map(|t| at(t, attr.mtime)).unwrap_or(attr.mtime);
        attr
    }

    pub fn mark_clean(&self) {
        self.dirty.store(false, Ordering::Release);
        self.dirty_end.store(0, Ordering::Release);
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// The size an application should see: what the metaserver says, or more if this mount
    /// has written past it and not committed yet.
    pub fn visible_size(&self, committed: u64) -> u64 {
        if self.is_dirty() {
            committed.max(self.dirty_end.load(Ordering::Acquire))
        } else {
            committed
        }
    }
}
