//! File operations as async functions over the metaserver and storage clients. The FUSE layer
//! (`fuse.rs`) only copies arguments, runs these on tokio and replies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dfs_proto::ErrorKind;
use dfs_proto::locks::{LockKind, LockOwner};
use dfs_proto::meta::*;
use dfs_proto::types::{Attr, FileKind, Ino, NodeAddr, NodeId, PieceId, Timestamp};
use tokio::sync::mpsc;

use crate::attrs::AttrCache;
use crate::dir::DirHandle;
use crate::error::{FsError, FsResult};
use crate::errseq::OpenHandle;
use crate::inode::{
    COMMIT_EVERY, IDLE_COMMIT, InodeState, MAX_CLOSING_CHUNKS, MAX_OPEN_CHUNKS, OpenChunk, SEGMENT_QUEUE, Stored,
    Writer,
};
use crate::kernel::KernelCache;
use crate::known_dirs::{Change, KnownDirs};
use crate::meta_client::MetaClient;
use crate::storage_pool::{PieceStream, StoragePool};
use crate::xattrs::XattrCache;

mod copy;
mod local;
mod read;
mod write;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One metadata request, or one read from a storage daemon.
    pub request: Duration,
    /// One step of a data transfer (a queued segment accepted, a piece made durable).
    pub data: Duration,
    pub connect: Duration,
}

pub struct Mount {
    pub meta: Arc<MetaClient>,
    pub storage: Arc<StoragePool>,
    pub chunk_size: u64,
    pub timeouts: Timeouts,
    attrs: AttrCache,
    xattrs: XattrCache,
    /// Tells the kernel to drop cached pages and attributes (set once mounted).
    kernel: OnceLock<KernelCache>,
    inodes: Mutex<HashMap<Ino, Arc<InodeState>>>,
    /// The (mtime, size) each inode had when this mount last filled or wrote its page cache:
    /// an open that finds the same version keeps the cache.
    cached_versions: Mutex<HashMap<Ino, (Timestamp, u64)>>,
    files: Mutex<HashMap<u64, Arc<OpenHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirHandle>>>>,
    next_handle: AtomicU64,
    /// Inodes opened by a `Create` not yet known to be durable, with their parent directory
    /// (`Writer::create_unlogged`; an `fsync` of the directory makes them durable).
    unlogged_creates: Mutex<HashMap<Ino, Ino>>,
    /// Directories whose every entry this mount knows (negative lookups answered here).
    known_dirs: Mutex<KnownDirs>,
}

/// What `open`/`create` hand back to the kernel.
pub struct OpenedFile {
    pub fh: u64,
    pub attr: Attr,
    /// The kernel's cached pages of this file are still valid.
    pub keep_cache: bool,
    /// Reads and writes of this open bypass the kernel's page cache (and a shared mapping of
    /// it is refused): it is writable and another mount has the file open. Pages written
    /// through a shared mapping reach the mount whenever the kernel writes them back, whole;
    /// a mapping on each of two mounts would write each one's stale pages over the other's
    /// (SQLite's `-shm` in WAL mode lost a transaction so), so one of them is refused instead.
    pub direct_io: bool,
}

/// How the version of a file being opened compares with the one this mount last cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Same,
    Changed,
    Unknown,
}

/// Versions remembered for page-cache reuse; past this many the memory is simply reset.
const MAX_CACHED_VERSIONS: usize = 200_000;

fn storage_down(ino: Ino, loc: &ChunkLocation) -> FsError {
    let holders: Vec<String> = loc.nodes.iter().map(|n| n.to_string()).collect();
    FsError::io(format!(
        "inode {ino}: chunk {} (piece {}) is on storage daemons [{}], none of them up",
        loc.chunk,
        loc.piece,
        holders.join(", ")
    ))
}

impl Mount {
    /// `attr_ttl`: how long attributes learned from replies may answer the kernel;
    /// `entry_ttl`: how long a name may be answered absent without asking (`known_dirs`).
    pub fn new(
        meta: Arc<MetaClient>,
        storage: StoragePool,
        chunk_size: u64,
        timeouts: Timeouts,
        attr_ttl: Duration,
        entry_ttl: Duration,
    ) -> Self {
        Mount {
            known_dirs: Mutex::new(KnownDirs::new(entry_ttl)),
            meta,
            storage: Arc::new(storage),
            chunk_size,
            timeouts,
            attrs: AttrCache::new(attr_ttl),
            xattrs: XattrCache::new(attr_ttl),
            kernel: OnceLock::new(),
            inodes: Mutex::new(HashMap::new()),
            cached_versions: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            unlogged_creates: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.kernel.set(KernelCache::start(notifier));
    }

    /// Records the version of `ino` whose content the page cache now holds; returns whether it
    /// was already the cached one.
    fn note_cached_version(&self, attr: &Attr) -> bool {
        self.note_version(attr) == Version::Same
    }

    /// Records the version the page cache now holds, and how it compares with the last one.
    fn note_version(&self, attr: &Attr) -> Version {
        let version = (attr.mtime, attr.size);
        let mut versions = self.cached_versions.lock().expect("versions");
        if versions.len() >= MAX_CACHED_VERSIONS {
            versions.clear();
        }
        match versions.insert(attr.ino, version) {
            Some(v) if v == version => Version::Same,
            Some(_) => Version::Changed,
            None => Version::Unknown,
        }
    }

    fn state(&self, ino: Ino) -> Option<Arc<InodeState>> {
        self.inodes.lock().expect("inodes").get(&ino).cloned()
    }

    fn state_or_new(&self, ino: Ino) -> Arc<InodeState> {
        self.inodes
            .lock()
            .expect("inodes")
            .entry(ino)
            .or_insert_with(|| Arc::new(InodeState::new(ino)))
            .clone()
    }

    /// Whether a file handle is open on `ino` on this mount.
    fn has_open_handles(&self, ino: Ino) -> bool {
        self.state(ino).is_some_and(|s| s.handles.load(Ordering::Acquire) > 0)
    }

    /// The state of `ino` with one more open handle counted. Counting under the map lock keeps
    /// a concurrent last `release` from dropping a state that is being reopened.
    fn acquire_state(&self, ino: Ino) -> Arc<InodeState> {
        let mut inodes = self.inodes.lock().expect("inodes");
        let state = inodes.entry(ino).or_insert_with(|| Arc::new(InodeState::new(ino)));
        state.handles.fetch_add(1, Ordering::AcqRel);
        state.clone()
    }

    /// Attributes just received from the metaserver: remembered (for the kernel's re-checks),
    /// and returned as this mount should report them.
    fn learned(&self, attr: Attr) -> Attr {
        self.attrs.put(&attr);
        self.visible(attr)
    }

    /// Attributes as this mount should report them (uncommitted writes and held-back
    /// attribute changes included).
    fn visible(&self, attr: Attr) -> Attr {
        match self.state(attr.ino) {
            Some(state) => {
                state.remember(&attr);
                state.overlay(attr)
            }
            None => attr,
        }
    }

    // ------------------------------------------------------------------------------------------
    // Metadata

    /// Whether `name` is known not to be in `parent` (a directory this mount made and nobody
    /// else changed since, within the entry timeout): answered without the metaserver.
    pub fn known_absent(&self, parent: Ino, name: &[u8]) -> bool {
        if check_name(name).is_err() {
            // Refused as the metaserver would refuse it (ENAMETOOLONG), not "absent".
            return false;
        }
        let known = self.known_dirs();
        known.absent(parent, name, std::time::Instant::now())
    }

    /// The directories known, emptied first if the metaserver session changed since (it may
    /// have restarted and lost changes this knowledge holds).
    fn known_dirs(&self) -> std::sync::MutexGuard<'_, KnownDirs> {
        let mut known = self.known_dirs.lock().expect("known dirs");
        known.in_session(self.meta.session_epoch());
        known
    }

    /// Records a change this mount made to `dir`'s entries, from the reply's `changes`.
    fn note_dir_change(&self, dir: Ino, change: Change<'_>, changes: &Changes, sent: std::time::Instant) {
        let after = changes.changed.iter().find(|a| a.ino == dir);
        self.known_dirs().changed(dir, change, after, sent);
    }

    pub async fn lookup(&self, parent: Ino, name: Vec<u8>) -> FsResult<Attr> {
        check_name(&name)?;
        let attr = self
            .meta
            .call(Lookup {
                parent,
                name: name.clone(),
            })
            .await?;
        self.known_dirs().found(parent, &name);
        Ok(self.learned(attr))
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        match self.attrs.get(ino) {
            Some(cached) => Ok(self.visible(cached)),
            None => Ok(self.learned(by_ino(self.meta.call(GetAttr { ino }).await)?)),
        }
    }

    pub async fn setattr(&self, req: SetAttr) -> FsResult<Attr> {
        let ino = req.ino;
        let truncates = req.size.is_some();
        let state = self.state(ino);
        // Held through the request: no write slips between the commit and a truncate.
        let mut writer = match &state {
            Some(state) => Some(state.writer.lock().await),
            None => None,
        };
        if let (Some(state), Some(w)) = (&state, writer.as_mut()) {
            // Held back only while a descriptor is open, whose last release will commit it. A
            // release that already began (it counts the handle off before it takes the writer)
            // may drop this state once the writer is free: a change held there is never sent.
            let open = state.handles.load(Ordering::Acquire) > 0;
            if open && !truncates && req.ctime.is_none() && (w.dirty || w.fresh) && w.error.is_none() {
                // A file being written: like the writes, the change is committed at close or
                // fsync (tar and cp -p set times and modes on files they are writing).
                state.hold_attrs(&req.changes);
                w.dirty = true;
                state.mark_dirty(0);
                return match state.last_attr() {
                    Some(a) => Ok(self.visible(a)),
                    None => Ok(self.learned(self.meta.call(GetAttr { ino }).await?)),
                };
            }
            // Queued writes land first, so a truncate or utimens applies after them. If they
            // cannot, their writers hear of it at close; the change applies to what is stored.
            let _ = self.commit(state, w, "setattr").await;
        }
        let attr = by_ino(self.meta.call(req).await)?;
        if truncates {
            // The kernel trims its own cache on truncate: what it keeps is this version.
            self.note_cached_version(&attr);
            if let Some(state) = &state {
                let mut cache = state.cache.lock().await;
                cache.size = attr.size;
                cache.invalidate();
            }
        }
        drop(writer);
        Ok(self.learned(attr))
    }

    pub async fn make_node(&self, req: MakeNode) -> FsResult<Attr> {
        check_name(&req.name)?;
        let (parent, name) = (req.parent, req.name.clone());
        let sent = std::time::Instant::now();
        let entry = self.meta.call(req).await?;
        self.attrs.apply(&entry.changes);
        self.note_dir_change(parent, Change::Added(&name), &entry.changes, sent);
        if entry.attr.kind == FileKind::Directory {
            self.known_dirs().created(&entry.attr, sent);
        }
        Ok(self.learned(entry.attr))
    }

    pub async fn unlink(&self, parent: Ino, name: Vec<u8>) -> FsResult<()> {
        check_name(&name)?;
        self.send_queued_releases().await;
        let sent = std::time::Instant::now();
        let changes = self
            .meta
            .call(Unlink {
                parent,
                name: name.clone(),
            })
            .await?;
        self.attrs.apply(&changes);
        self.note_dir_change(parent, Change::Removed(&name), &changes, sent);
        Ok(())
    }

    /// A name about to go may be a file this mount just closed: its release goes first, so
    /// that the metaserver deletes it at once rather than keep it as open.
    async fn send_queued_releases(&self) {
        if self.meta.releases_pending() {
            self.meta.flush_releases().await;
        }
    }

    pub async fn rmdir(&self, parent: Ino, name: Vec<u8>) -> FsResult<()> {
        check_name(&name)?;
        let sent = std::time::Instant::now();
        let changes = self
            .meta
            .call(RemoveDir {
                parent,
                name: name.clone(),
            })
            .await?;
        self.attrs.apply(&changes);
        self.note_dir_change(parent, Change::Removed(&name), &changes, sent);
        self.known_dirs().forget_removed(&changes.removed);
        Ok(())
    }

    pub async fn rename(&self, req: Rename) -> FsResult<()> {
        check_name(&req.name)?;
        check_name(&req.new_name)?;
        self.send_queued_releases().await;
        let (parent, name, new_parent, new_name) = (req.parent, req.name.clone(), req.new_parent, req.new_name.clone());
        let exchange = matches!(req.mode, RenameMode::Exchange);
        let sent = std::time::Instant::now();
        let changes = self.meta.call(req).await?;
        self.attrs.apply(&changes);
        if exchange {
            self.note_dir_change(parent, Change::Same, &changes, sent);
            if new_parent != parent {
                self.note_dir_change(new_parent, Change::Same, &changes, sent);
            }
        } else if new_parent == parent {
            let change = Change::Renamed {
                from: &name,
                to: &new_name,
            };
            self.note_dir_change(parent, change, &changes, sent);
        } else {
            self.note_dir_change(parent, Change::Removed(&name), &changes, sent);
            self.note_dir_change(new_parent, Change::Added(&new_name), &changes, sent);
        }
        // A directory replaced by the rename is gone.
        self.known_dirs().forget_removed(&changes.removed);
        Ok(())
    }

    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: Vec<u8>) -> FsResult<Attr> {
        check_name(&new_name)?;
        let sent = std::time::Instant::now();
        let entry = self
            .meta
            .call(Link {
                ino,
                new_parent,
                new_name: new_name.clone(),
            })
            .await?;
        self.attrs.apply(&entry.changes);
        self.note_dir_change(new_parent, Change::Added(&new_name), &entry.changes, sent);
        Ok(self.learned(entry.attr))
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        by_ino(self.meta.call(ReadLink { ino }).await)
    }

    pub async fn statfs(&self) -> FsResult<FsStats> {
        Ok(self.meta.call(StatFs {}).await?)
    }

    /// fallocate(2). Without flags it extends the file (the new range reads as zeros and, like
    /// any hole, takes no storage until written); with FALLOC_FL_KEEP_SIZE it changes nothing
    /// (space is not reserved on the storage daemons). FALLOC_FL_PUNCH_HOLE and
    /// FALLOC_FL_ZERO_RANGE make the range read as zeros: whole chunks in it are dropped (they
    /// take no storage any more), partial ones get zeros written; ZERO_RANGE without
    /// KEEP_SIZE also extends the file to the end of the range.
    pub async fn fallocate(&self, ino: Ino, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let supported = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(FsError::new(
                libc::EOPNOTSUPP,
                format!("inode {ino}: fallocate mode {mode:#x} is not supported"),
            ));
        }
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| FsError::new(libc::EFBIG, format!("inode {ino}: fallocate past the largest offset")))?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            return self.zero_range(ino, offset, end, keep_size).await;
        }
        if keep_size {
            return Ok(());
        }
        let size = self.getattr(ino).await?.size;
        self.setattr(SetAttr {
            ino,
            changes: AttrChanges::default(),
            size: Some(size.max(end)),
            ctime: None,
        })
        .await?;
        Ok(())
    }

    /// Makes `offset..end` read as zeros (up to the size; beyond it too, growing the file,
    /// unless `keep_size`).
    async fn zero_range(&self, ino: Ino, offset: u64, end: u64, keep_size: bool) -> FsResult<()> {
        let state = self.state_or_new(ino);
        // Pending writes land first, so the zeros apply after them.
        {
            let mut w = state.writer.lock().await;
            self.commit(&state, &mut w, "fallocate").await?;
        }
        let size = by_ino(self.meta.call(GetAttr { ino }).await)?.size;
        let stop = end.min(size);
        let cs = self.chunk_size;
        if offset < stop {
            let first_whole = offset.div_ceil(cs);
            let end_whole = stop / cs;
            if first_whole < end_whole {
                by_ino(
                    self.meta
                        .call(Deallocate {
                            ino,
                            first: first_whole,
                            last: end_whole - 1,
                        })
                        .await,
                )?;
            }
            // The partial chunks at either end: zeros written where data is stored.
            let mut partial = Vec::new();
            if first_whole < end_whole {
                partial.push((offset, first_whole * cs));
                partial.push((end_whole * cs, stop));
            } else {
                partial.push((offset, stop));
            }
            state.cache.lock().await.invalidate();
            for (from, to) in partial.into_iter().filter(|(a, b)| a < b) {
                let chunk = from / cs;
                let (_, located) = self.locate(&state, chunk, chunk, to).await?;
                let holds_data = located
                    .first()
                    .is_some_and(|l| l.as_ref().is_some_and(|l| chunk * cs + l.len > from));
                if holds_data {
                    // In pieces the size of a FUSE write (a segment on the wire is bounded).
                    let zeros = Bytes::from(vec![0u8; (to - from).min(1 << 20) as usize]);
                    let mut at = from;
                    while at < to {
                        let n = (to - at).min(zeros.len() as u64) as usize;
                        let written = self.write(ino, at, zeros.slice(..n)).await?;
                        if written == 0 {
                            return Err(FsError::io(format!("inode {ino}: zeros at {at} could not be written")));
                        }
                        at += written as u64;
                    }
                }
            }
            let mut w = state.writer.lock().await;
            self.commit(&state, &mut w, "fallocate").await?;
        }
        if !keep_size && end > size {
            self.setattr(SetAttr {
                ino,
                changes: AttrChanges::default(),
                size: Some(end),
                ctime: None,
            })
            .await?;
        }
        self.attrs.forget(ino);
        self.cached_versions.lock().expect("versions").remove(&ino);
        state.cache.lock().await.invalidate();
        Ok(())
    }

    // ------------------------------------------------------------------------------------------
    // Extended attributes

    /// Whether the attributes this mount holds (fresh, at most `attr_timeout_ms` old) say the
    /// inode has no extended attributes at all.
    fn known_without_xattrs(&self, ino: Ino) -> bool {
        self.attrs.get(ino).is_some_and(|a| !a.has_xattrs)
    }

    pub async fn getxattr(&self, ino: Ino, name: Vec<u8>) -> FsResult<Vec<u8>> {
        if let Some(answer) = self.getxattr_now(ino, &name) {
            return answer;
        }
        let answer = match self
            .meta
            .call(GetXattr {
                ino,
                name: name.clone(),
            })
            .await
        {
            Ok(value) => Some(value),
            Err(e) if e.remote_kind() == Some(ErrorKind::NoAttribute) => None,
            Err(e) => return by_ino(Err(e)),
        };
        self.xattrs.put(ino, &name, answer.clone());
        answer.ok_or_else(|| no_attribute(ino, &name))
    }

    /// The names, each followed by a NUL, as listxattr(2) returns them.
    pub async fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        if self.known_without_xattrs(ino) {
            return Ok(Vec::new());
        }
        let names = by_ino(self.meta.call(ListXattr { ino }).await)?;
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub async fn setxattr(&self, ino: Ino, name: Vec<u8>, value: Vec<u8>, flags: i32) -> FsResult<()> {
        let mode = match flags {
            0 => XattrMode::Set,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return Err(FsError::new(libc::EINVAL, format!("setxattr flags {flags:#x}"))),
        };
        self.xattrs.forget(ino);
        let attr = by_ino(self.meta.call(SetXattr { ino, name, value, mode }).await)?;
        self.learned(attr);
        Ok(())
    }

    pub async fn removexattr(&self, ino: Ino, name: Vec<u8>) -> FsResult<()> {
        self.xattrs.forget(ino);
        let attr = by_ino(self.meta.call(RemoveXattr { ino, name }).await)?;
        self.learned(attr);
        Ok(())
    }

    // ------------------------------------------------------------------------------------------
    // Locks (cluster-wide, through the metaserver)

    /// F_GETLK: the conflicting lock, if any, as (start, end, kind, pid).
    pub async fn getlk(
        &self,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
    ) -> FsResult<Option<(u64, u64, i32, u32)>> {
        let kind = lock_kind(typ)?;
        let session = self.meta.session_id().await?;
        let conflict = self
            .meta
            .call(TestLock {
                ino,
                owner: LockOwner { session, owner },
                start,
                end,
                kind,
            })
            .await?;
        Ok(conflict.map(|c| {
            let typ = if c.range.kind == LockKind::Write {
                libc::F_WRLCK
            } else {
                libc::F_RDLCK
            };
            // A process id means something only on the holder's own machine.
            let pid = if c.session == session { c.pid } else { 0 };
            (c.range.start, c.range.end, typ, pid)
        }))
    }

    /// F_SETLK / F_SETLKW / flock. Before an unlock, this mount's writes are committed, and
    /// after a lock is granted, cached pages and attributes of the file are dropped: what one
    /// lock holder wrote, the next one reads (what databases such as SQLite rely on).
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        ino: Ino,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        typ: i32,
        wait: bool,
    ) -> FsResult<()> {
        let kind = lock_kind(typ)?;
        if kind == LockKind::Unlock {
            if !self.meta.holds_lock(ino, Some(owner)) {
                return Ok(());
            }
            // What was written under the lock is committed before the next holder can look;
            // a failure is reported to the writers at their close or fsync.
            self.commit_inode(ino).await;
        }
        loop {
            let (outcome, session) = self
                .meta
                .call_in_session_named(|session| SetLock {
                    ino,
                    owner: LockOwner { session, owner },
                    pid,
                    start,
                    end,
                    kind,
                    wait_ms: if wait { 1000 } else { 0 },
                })
                .await?;
            match outcome {
                LockOutcome::Granted { hold } => {
                    self.meta.note_lock(ino, owner, pid, start, end, kind);
                    if kind != LockKind::Unlock {
                        self.meta.note_hold(ino, Fence { session, hold }).await;
                    }
                    if kind != LockKind::Unlock {
                        self.drop_cached(ino).await;
                    }
                    return Ok(());
                }
                LockOutcome::Conflict(c) if !wait => {
                    return Err(FsError::new(
                        libc::EAGAIN,
                        format!(
                            "inode {ino}: bytes {}..={} are locked (session {})",
                            c.range.start, c.range.end, c.session
                        ),
                    ));
                }
                LockOutcome::Conflict(_) => {
                    // The kernel does not pass on interrupts: stop waiting once the process
                    // that asked is gone.
                    if pid != 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        return Err(FsError::new(
                            libc::EINTR,
                            format!("inode {ino}: lock waiter {pid} exited"),
                        ));
                    }
                }
            }
        }
    }

    /// Drops the locks `owner` holds on `ino` (its process closed the file, or its flock'd
    /// open file was released). Costs nothing when it holds none.
    pub async fn unlock_owner(&self, ino: Ino, owner: u64) -> FsResult<()> {
        self.setlk(ino, owner, 0, 0, u64::MAX, libc::F_UNLCK, false).await
    }

    /// Drops every lock this mount holds on `ino` (its last open handle here closed).
    async fn unlock_all(&self, ino: Ino) {
        for owner in self.meta.lock_owners(ino) {
            if let Err(e) = self.unlock_owner(ino, owner).await {
                tracing::warn!("inode {ino}: cannot release lock of owner {owner:#x}: {e}");
            }
        }
    }

    /// Forgets cached content and attributes of `ino`, here and in the kernel.
    async fn drop_cached(&self, ino: Ino) {
        self.attrs.forget(ino);
        self.cached_versions.lock().expect("versions").remove(&ino);
        if let Some(state) = self.state(ino) {
            state.cache.lock().await.invalidate();
        }
        if let Some(kernel) = self.kernel.get() {
            kernel.invalidate(ino).await;
        }
    }

    // ------------------------------------------------------------------------------------------
    // Open files

    /// Records an open handle (allocated before the request, as its id) for an inode whose
    /// state was acquired with `acquire_state`.
    fn register_handle(&self, fh: u64, state: &InodeState, writable: bool) {
        let ino = state.ino;
        let handle = Arc::new(OpenHandle::new(ino, writable, &state.errors));
        self.files.lock().expect("files").insert(fh, handle);
        self.meta.note_open(fh, ino);
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: Ino,
        name: Vec<u8>,
        perm: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
        writable: bool,
    ) -> FsResult<OpenedFile> {
        check_name(&name)?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let sent = std::time::Instant::now();
        let created = self
            .meta
            .call_releasing(|session, released| Create {
                parent,
                name: name.clone(),
                perm,
                uid,
                gid,
                exclusive,
                session,
                handle: fh,
                released,
            })
            .await
            .map_err(|e| {
                let e = FsError::from(e);
                if e.kind_is(ErrorKind::NoSpace) {
                    tracing::warn!(
                        "cannot create {:?} in directory {parent}: {}",
                        String::from_utf8_lossy(&name),
                        e
                    );
                }
                e
            })?;
        let attr = created.attr;
        self.attrs.apply(&created.changes);
        if created.created {
            self.note_dir_change(parent, Change::Added(&name), &created.changes, sent);
        } else {
            self.known_dirs().found(parent, &name);
        }
        let state = self.acquire_state(attr.ino);
        {
            let mut cache = state.cache.lock().await;
            if created.created {
                cache.reset(attr.size, vec![]);
            } else {
                cache.size = state.visible_size(attr.size);
                cache.invalidate();
            }
        }
        {
            let mut w = state.writer.lock().await;
            w.first_piece = created.first_piece;
            w.fresh = created.created;
            // Only a file this request made is new in the metaserver's log: opening an existing
            // one (SQLite opens its -wal and -shm with O_CREAT on every connection) changed
            // nothing there to wait for, and that file may be unlinked by another mount before
            // this descriptor closes, which must not read as a lost create.
            if created.created {
                w.create_unlogged = true;
                self.unlogged_creates
                    .lock()
                    .expect("unlogged creates")
                    .insert(attr.ino, parent);
            }
        }
        self.register_handle(fh, &state, writable);
        // A new file has no cached pages; an existing one keeps them if unchanged.
        let keep_cache = self.note_cached_version(&attr) && !created.created;
        Ok(OpenedFile {
            fh,
            attr: self.learned(attr),
            keep_cache,
            direct_io: writable && created.open_elsewhere,
        })
    }

    pub async fn open(&self, ino: Ino, writable: bool) -> FsResult<OpenedFile> {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let opened = self
            .meta
            .call_releasing(|session, released| Open {
                ino,
                session,
                handle: fh,
                released,
            })
            .await;
        let opened = by_ino(opened)?;
        if opened.attr.nlink == 0 && !self.has_open_handles(ino) {
            // An open comes through a name (a path, or `/proc/PID/fd`, whose file is then open
            // here). An unlinked inode this mount does not have open was reached through an
            // entry the kernel cached before another mount removed the name: the inode lives
            // on only for the processes holding it there. ESTALE makes the kernel look the
            // name up again: ENOENT, or the file now under that name, as on a local disk.
            self.meta.release(fh, ino);
            return Err(FsError::new(
                libc::ESTALE,
                format!("inode {ino} was removed by another mount (reached through a cached entry)"),
            ));
        }
        let state = self.acquire_state(ino);
        {
            // Close-to-open: every open sees the file as last committed anywhere.
            let mut cache = state.cache.lock().await;
            let size = state.visible_size(opened.attr.size);
            cache.reset(size, opened.chunks);
        }
        self.register_handle(fh, &state, writable);
        // Close-to-open: the cache survives only if nobody changed the file since it was filled
        // (this mount's own uncommitted writes are in the cache, so a dirty file keeps it too).
        let version = self.note_version(&opened.attr);
        let keep_cache = version == Version::Same || state.is_dirty();
        if version == Version::Changed
            && !state.is_dirty()
            && let Some(kernel) = self.kernel.get()
        {
            // Changed elsewhere since this mount last had it: the kernel's size and times go
            // too, or it would read up to the size it remembers (of this mount's own write).
            kernel.invalidate_attributes(ino).await;
        }
        Ok(OpenedFile {
            fh,
            attr: self.learned(opened.attr),
            keep_cache,
            direct_io: writable && opened.open_elsewhere,
        })
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(ino) = self.files.lock().expect("files").remove(&fh).map(|h| h.ino) else {
            return Ok(());
        };
        let Some(state) = self.state(ino) else {
            self.meta.release(fh, ino);
            return Ok(());
        };
        let last = {
            let _inodes = self.inodes.lock().expect("inodes");
            state.handles.fetch_sub(1, Ordering::AcqRel) == 1
        };
        let result = if last {
            let r = self.flush_inode(&state).await;
            if self.meta.holds_lock(ino, None) {
                self.unlock_all(ino).await;
            }
            if let Err(e) = &r {
                tracing::error!("inode {ino}: data written before the last close was not committed: {e}");
            }
            let mut inodes = self.inodes.lock().expect("inodes");
            if state.handles.load(Ordering::Acquire) == 0 && !state.is_dirty() {
                inodes.remove(&ino);
            }
            r
        } else {
            Ok(())
        };
        self.meta.release(fh, ino);
        result
    }

    /// `close()` of a descriptor of open file `fh` by the process owning `owner`: makes
    /// everything written to the file on this mount durable and visible, and reports a write
    /// failure this closer has not heard of (see `errseq`).
    pub async fn flush(&self, ino: Ino, fh: u64, owner: u64) -> FsResult<()> {
        let Some(state) = self.state(ino) else { return Ok(()) };
        self.flush_and_forget_failed(&state).await;
        match self.handle(fh) {
            Some(handle) => handle.check_close(owner, &state.errors),
            None => Ok(()),
        }
    }

    /// `fsync()` of open file `fh`: like a close, but failures are tracked per open file.
    pub async fn fsync(&self, ino: Ino, fh: u64) -> FsResult<()> {
        let Some(state) = self.state(ino) else { return Ok(()) };
        self.flush_and_forget_failed(&state).await;
        match self.handle(fh) {
            Some(handle) => handle.check_fsync(&state.errors),
            None => Ok(()),
        }
    }

    /// Commits; if that fails, waits (outside the writer) for the kernel to drop what it
    /// cached of the lost writes, so that the close or fsync reporting the failure returns
    /// only once no stale byte or size can be read on this mount.
    async fn flush_and_forget_failed(&self, state: &InodeState) {
        if self.flush_inode(state).await.is_err()
            && let Some(kernel) = self.kernel.get()
        {
            kernel.invalidate(state.ino).await;
        }
    }

    fn handle(&self, fh: u64) -> Option<Arc<OpenHandle>> {
        self.files.lock().expect("files").get(&fh).cloned()
    }

    /// Commits what this mount wrote to `ino` (before a lock is released); a failure is
    /// recorded for the writers.
    async fn commit_inode(&self, ino: Ino) {
        if let Some(state) = self.state(ino) {
            let _ = self.flush_inode(&state).await;
        }
    }

    /// Commits everything uncommitted. A failure is recorded (`fail_writes`), not reported:
    /// each writer hears of it at its own close or fsync.
    async fn flush_inode(&self, state: &InodeState) -> FsResult<()> {
        let mut w = state.writer.lock().await;
        self.commit(state, &mut w, "flush").await
    }

    /// Writes that were acknowledged to applications cannot be stored: records the failure for
    /// every descriptor open for writing (`errseq`), drops the uncommitted writes (the file
    /// stays as last committed), and forgets everything cached that may hold them, here and
    /// in the kernel, so nobody on this mount reads bytes that are stored nowhere.
    fn fail_writes(&self, state: &InodeState, w: &mut Writer, e: &FsError) {
        let ino = state.ino;
        tracing::warn!("inode {ino}: written data that was not committed is lost: {e}");
        w.discard();
        state.mark_clean();
        state.clear_held_attrs();
        state.errors.record(e.clone());
        self.attrs.forget(ino);
        self.cached_versions.lock().expect("versions").remove(&ino);
        if let Ok(mut cache) = state.cache.try_lock() {
            cache.invalidate();
            cache.size = 0;
        } else {
            state.stale_cache();
        }
        if let Some(kernel) = self.kernel.get() {
            // Not waited for: the kernel may need this mount to answer writes first.
            kernel.invalidate_soon(ino);
        }
    }

    /// Waits for every piece being written to be durable, then commits them all (with the
    /// attribute changes held back meanwhile), or none if any write failed. A failure drops
    /// the uncommitted writes and is recorded for their writers (`fail_writes`).
    async fn commit(&self, state: &InodeState, w: &mut Writer, why: &'static str) -> FsResult<()> {
        if w.dirty {
            tracing::debug!("inode {}: commit ({why})", state.ino);
        }
        w.close_all();
        if w.dirty
            && !w.closing.is_empty()
            && let Some(in_flight) = w.in_flight_pieces()
            && let Some(done) = self.commit_ahead(state, w, in_flight).await
        {
            return done;
        }
        w.settle_all().await;
        if let Some(e) = w.error.take() {
            self.fail_writes(state, w, &e);
            return Err(e);
        }
        if !w.dirty {
            // Nothing to commit but perhaps the create. After a close or fsync the file is no
            // longer "just created", and attribute changes go to the metaserver at once.
            if w.create_unlogged {
                self.make_create_durable(state, w).await?;
            }
            w.fresh = false;
            return Ok(());
        }
        let request = CommitWrite {
            ino: state.ino,
            pieces: w.done.clone(),
            min_size: w.end,
            attrs: state.held_attrs(),
            id: CommitId::default(),
            fence: self.meta.fence_for_commit(w.fence),
            pieces_in_flight: false,
        };
        // Nothing is taken from the writer until the commit is known to have happened.
        let attr = match self.meta.commit(request).await {
            Ok(attr) => attr,
            Err(e) => {
                // Refused as stale (a lock lost, a piece gone) or the inode gone (its create
                // lost by a metaserver that stopped before logging it): to the writer, an I/O
                // error.
                let e = match FsError::from(e) {
                    e if e.errno == libc::ESTALE || e.errno == libc::ENOENT => FsError::io(e.message),
                    e => e,
                };
                tracing::warn!("inode {}: cannot commit written data: {e}", state.ino);
                self.fail_writes(state, w, &e);
                return Err(e);
            }
        };
        self.committed(state, w, &attr).await;
        Ok(())
    }

    /// The writes are committed as `attr`: nothing of them is pending any more.
    async fn committed(&self, state: &InodeState, w: &mut Writer, attr: &Attr) {
        w.done.clear();
        w.dirty = false;
        w.fresh = false;
        // Committed on top of the create, so after it in the metaserver's log: durable too.
        self.create_logged(state.ino, w);
        w.end = 0;
        w.fence = None;
        state.clear_held_attrs();
        state.mark_clean();
        // The page cache holds what was just written: that is this version.
        self.note_cached_version(attr);
        state.remember(attr);
        self.attrs.put(attr);
        let mut cache = state.cache.lock().await;
        cache.size = attr.size;
        cache.invalidate();
    }

    /// Commits while the daemons make the new pieces durable, instead of after (one round
    /// trip and one log sync less on the path of every small file's close): `in_flight` are
    /// those pieces as they will be once durable. What did not become durable is then
    /// withdrawn (`RetractWrite`) before the close returns: a copy that failed is forgotten
    /// (the metaserver re-makes it from the others), and if a piece failed altogether the
    /// whole commit is undone and the close fails, as it would have without committing
    /// ahead. None if the metaserver wants durable pieces for this commit (a chunk named
    /// holds a piece already): the caller commits the usual way, after waiting.
    async fn commit_ahead(
        &self,
        state: &InodeState,
        w: &mut Writer,
        in_flight: Vec<WrittenPiece>,
    ) -> Option<FsResult<()>> {
        let ino = state.ino;
        // The size the metaserver last reported: what the file goes back to if this fails.
        let size_before = state.last_attr().map(|a| a.size);
        let mut pieces = w.done.clone();
        pieces.extend(in_flight.iter().cloned());
        // Undone as a whole if a piece fails, the durable ones committed with it included.
        let all: Vec<(u64, PieceId, Vec<NodeId>)> =
            pieces.iter().map(|p| (p.chunk, p.piece, p.nodes.clone())).collect();
        let request = CommitWrite {
            ino,
            pieces,
            min_size: w.end,
            attrs: state.held_attrs(),
            id: CommitId::default(),
            fence: self.meta.fence_for_commit(w.fence),
            pieces_in_flight: true,
        };
        let (committed, ()) = tokio::join!(self.meta.commit(request), w.settle_all());
        let attr = match committed {
            Ok(attr) => attr,
            Err(e) if e.remote_kind() == Some(ErrorKind::Busy) => {
                tracing::debug!("inode {ino}: committing after the pieces are durable: {e}");
                return None;
            }
            Err(e) => {
                // As a commit after the pieces: the writes are lost (see `commit`).
                let e = match FsError::from(e) {
                    e if e.errno == libc::ESTALE || e.errno == libc::ENOENT => FsError::io(e.message),
                    e => e,
                };
                tracing::warn!("inode {ino}: cannot commit written data: {e}");
                self.fail_writes(state, w, &e);
                return Some(Err(e));
            }
        };
        // What became durable, against what was committed.
        let mut failed_copies = Vec::new();
        let mut whole_piece_failed = false;
        for p in &in_flight {
            match w.done.iter().find(|d| d.piece == p.piece) {
                Some(d) if d.len == p.len => {
                    let lost: Vec<NodeId> = p.nodes.iter().filter(|n| !d.nodes.contains(n)).copied().collect();
                    if !lost.is_empty() {
                        failed_copies.push((p.chunk, p.piece, lost));
                    }
                }
                Some(d) => {
                    tracing::error!(
                        "inode {ino}: piece {} is {} bytes where {} were written",
                        p.piece,
                        d.len,
                        p.len
                    );
                    w.error
                        .get_or_insert_with(|| FsError::io(format!("inode {ino}: piece {} stored short", p.piece)));
                    whole_piece_failed = true;
                }
                None => whole_piece_failed = true,
            }
        }
        if whole_piece_failed {
            self.retract(ino, all, size_before.map(|before| (attr.size, before)))
                .await;
            let e = w
                .error
                .take()
                .unwrap_or_else(|| FsError::io(format!("inode {ino}: a piece was not stored")));
            self.fail_writes(state, w, &e);
            return Some(Err(e));
        }
        if !failed_copies.is_empty() {
            self.retract(ino, failed_copies, None).await;
        }
        self.committed(state, w, &attr).await;
        Some(Ok(()))
    }

    /// Withdraws committed copies that did not become durable. If the metaserver cannot be
    /// told, it finds them missing later (its daemons' inventories) and treats them as lost
    /// copies.
    async fn retract(&self, ino: Ino, copies: Vec<(u64, PieceId, Vec<NodeId>)>, size: Option<(u64, u64)>) {
        for batch in copies.chunks(MAX_RETRACTED) {
            let request = RetractWrite {
                ino,
                copies: batch.to_vec(),
                size,
            };
            if let Err(e) = self.meta.call(request).await {
                tracing::error!(
                    "inode {ino}: cannot withdraw the copies that did not become durable ({} chunks): {e}",
                    batch.len()
                );
            }
        }
    }

    /// Makes the create of a file opened by `Create` durable (`SyncCreates`). A create the
    /// metaserver lost (it stopped before logging it) is a failure for every writer of the
    /// file, like lost data; one that cannot be confirmed now stays to be confirmed later.
    async fn make_create_durable(&self, state: &InodeState, w: &mut Writer) -> FsResult<()> {
        let ino = state.ino;
        let missing = self.meta.call(SyncCreates { inos: vec![ino] }).await.map_err(|e| {
            let e = FsError::from(e);
            tracing::warn!("inode {ino}: cannot make its creation durable: {e}");
            e
        })?;
        self.create_logged(ino, w);
        if missing.contains(&ino) {
            let e = FsError::io(format!(
                "inode {ino}: its creation was lost (the metaserver stopped before logging it)"
            ));
            self.fail_writes(state, w, &e);
            return Err(e);
        }
        Ok(())
    }

    fn create_logged(&self, ino: Ino, w: &mut Writer) {
        if std::mem::take(&mut w.create_unlogged) {
            self.unlogged_creates.lock().expect("unlogged creates").remove(&ino);
        }
    }

    /// `fsync()` of a directory: every other directory operation is durable when it returns;
    /// creates in it this mount has not yet made durable are made so now.
    pub async fn fsyncdir(&self, dir: Ino) -> FsResult<()> {
        let inos: Vec<Ino> = {
            let unlogged = self.unlogged_creates.lock().expect("unlogged creates");
            unlogged
                .iter()
                .filter(|&(_, &parent)| parent == dir)
                .map(|(&ino, _)| ino)
                .collect()
        };
        for batch in inos.chunks(MAX_SYNC_CREATES) {
            let missing = self
                .meta
                .call(SyncCreates { inos: batch.to_vec() })
                .await
                .map_err(FsError::from)?;
            {
                // Durable now, or lost: either way nothing more to wait for here (a lost one is
                // reported by its own close or fsync, whose writer still asks).
                let mut unlogged = self.unlogged_creates.lock().expect("unlogged creates");
                for ino in batch {
                    unlogged.remove(ino);
                }
            }
            if let Some(lost) = missing.first() {
                // Each file's own close or fsync reports it too (its writer confirms again).
                return Err(FsError::io(format!(
                    "directory {dir}: the creation of inode {lost} in it was lost (the metaserver stopped before logging it)"
                )));
            }
        }
        Ok(())
    }

    /// Commits files nobody has written to for a while (run for the life of the mount).
    pub async fn commit_idle_writers(&self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let states: Vec<Arc<InodeState>> = self.inodes.lock().expect("inodes").values().cloned().collect();
            for state in states.into_iter().filter(|s| s.is_dirty()) {
                // A writer busy right now is not idle.
                let Ok(mut w) = state.writer.try_lock() else { continue };
                if w.dirty
                    && w.last_write.elapsed() >= IDLE_COMMIT
                    && let Err(e) = self.commit(&state, &mut w, "idle").await
                {
                    tracing::warn!("inode {}: background commit failed (reported at close): {e}", state.ino);
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Directories

    pub async fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let attr = match self.attrs.get(ino) {
            Some(a) => a,
            None => self.learned(by_ino(self.meta.call(GetAttr { ino }).await)?),
        };
        if attr.kind != FileKind::Directory {
            return Err(FsError::new(libc::ENOTDIR, format!("inode {ino} is not a directory")));
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .expect("dirs")
            .insert(fh, Arc::new(tokio::sync::Mutex::new(DirHandle::new(attr))));
        Ok(fh)
    }

    pub fn dir_handle(&self, fh: u64) -> FsResult<Arc<tokio::sync::Mutex<DirHandle>>> {
        self.dirs
            .lock()
            .expect("dirs")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, format!("no directory handle {fh}")))
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().expect("dirs").remove(&fh);
    }

    /// Fetches the next page of a directory listing into its handle.
    pub async fn fetch_dir_page(&self, handle: &mut DirHandle) -> FsResult<()> {
        let page = self
            .meta
            .call(ReadDir {
                dir: handle.dir.ino,
                after: handle.cursor.clone(),
                limit: crate::dir::PAGE,
            })
            .await?;
        let entries = page.entries.into_iter().map(|mut e| {
            e.attr = self.learned(e.attr);
            e
        });
        handle.append(entries.collect(), page.more);
        Ok(())
    }

    /// Commits everything still uncommitted (at unmount).
    pub async fn flush_all(&self) {
        let states: Vec<Arc<InodeState>> = self.inodes.lock().expect("inodes").values().cloned().collect();
        for state in states {
            if state.is_dirty()
                && let Err(e) = self.flush_inode(&state).await
            {
                tracing::error!("inode {}: uncommitted data lost at unmount: {e}", state.ino);
            }
        }
    }
}

/// The answer to a request addressed by inode number. An inode that no longer exists means
/// the kernel reached it through a stale cached entry (another mount removed it): ESTALE makes
/// the kernel look the path up again and retry, as NFS clients do.
fn by_ino<T>(r: Result<T, dfs_proto::RpcError>) -> FsResult<T> {
    r.map_err(|e| {
        let stale = e.remote_kind() == Some(ErrorKind::NotFound);
        let e = FsError::from(e);
        if stale {
            FsError::new(libc::ESTALE, e.message)
        } else {
            e
        }
    })
}

fn lock_kind(typ: i32) -> FsResult<LockKind> {
    match typ {
        libc::F_RDLCK => Ok(LockKind::Read),
        libc::F_WRLCK => Ok(LockKind::Write),
        libc::F_UNLCK => Ok(LockKind::Unlock),
        _ => Err(FsError::new(libc::EINVAL, format!("lock type {typ}"))),
    }
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn check_name(name: &[u8]) -> FsResult<()> {
    dfs_proto::names::validate_name(name).map_err(FsError::from)
}

fn no_attribute(ino: Ino, name: &[u8]) -> FsError {
    FsError::new(libc::ENODATA, format!("inode {ino}: no attribute {:?}", show(name)))
}
