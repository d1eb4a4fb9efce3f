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
use dfs_proto::types::{Attr, FileKind, Ino, NodeAddr, Timestamp};
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
use crate::meta_client::MetaClient;
use crate::storage_pool::{PieceStream, StoragePool};
use crate::xattrs::XattrCache;

mod copy;

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
}

/// What `open`/`create` hand back to the kernel.
pub struct OpenedFile {
    pub fh: u64,
    pub attr: Attr,
    /// The kernel's cached pages of this file are still valid.
    pub keep_cache: bool,
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
    /// `attr_ttl`: how long attributes learned from replies may answer the kernel.
    pub fn new(
        meta: Arc<MetaClient>,
        storage: StoragePool,
        chunk_size: u64,
        timeouts: Timeouts,
        attr_ttl: Duration,
    ) -> Self {
        Mount {
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

    pub async fn lookup(&self, parent: Ino, name: Vec<u8>) -> FsResult<Attr> {
        check_name(&name)?;
        Ok(self.learned(self.meta.call(Lookup { parent, name }).await?))
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
        let entry = self.meta.call(req).await?;
        self.attrs.apply(&entry.changes);
        Ok(self.learned(entry.attr))
    }

    pub async fn unlink(&self, parent: Ino, name: Vec<u8>) -> FsResult<()> {
        check_name(&name)?;
        self.send_queued_releases().await;
        self.attrs.apply(&self.meta.call(Unlink { parent, name }).await?);
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
        self.attrs.apply(&self.meta.call(RemoveDir { parent, name }).await?);
        Ok(())
    }

    pub async fn rename(&self, req: Rename) -> FsResult<()> {
        check_name(&req.name)?;
        check_name(&req.new_name)?;
        self.send_queued_releases().await;
        self.attrs.apply(&self.meta.call(req).await?);
        Ok(())
    }

    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: Vec<u8>) -> FsResult<Attr> {
        check_name(&new_name)?;
        let entry = self
            .meta
            .call(Link {
                ino,
                new_parent,
                new_name,
            })
            .await?;
        self.attrs.apply(&entry.changes);
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
        if name.starts_with(b"system.") {
            // ACLs and the like need the kernel's interpretation, which dfs does not offer.
            return Err(FsError::new(
                libc::EOPNOTSUPP,
                format!("inode {ino}: attribute {:?} is not supported", show(&name)),
            ));
        }
        let cached = match self.xattrs.get(ino, &name) {
            Some(answer) => Some(answer),
            None if self.known_without_xattrs(ino) => Some(None),
            None => None,
        };
        let answer = match cached {
            Some(answer) => answer,
            None => {
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
                answer
            }
        };
        answer.ok_or_else(|| FsError::new(libc::ENODATA, format!("inode {ino}: no attribute {:?}", show(&name))))
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
        }
        self.register_handle(fh, &state, writable);
        // A new file has no cached pages; an existing one keeps them if unchanged.
        let keep_cache = self.note_cached_version(&attr) && !created.created;
        Ok(OpenedFile {
            fh,
            attr: self.learned(attr),
            keep_cache,
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
        w.settle_all().await;
        if let Some(e) = w.error.take() {
            self.fail_writes(state, w, &e);
            return Err(e);
        }
        if !w.dirty {
            // Nothing to commit: the create itself was durable. After a close or fsync the file
            // is no longer "just created", and attribute changes go to the metaserver at once.
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
        };
        // Nothing is taken from the writer until the commit is known to have happened.
        let attr = match self.meta.commit(request).await {
            Ok(attr) => attr,
            Err(e) => {
                // Refused as stale (a lock lost, a piece gone): to the writer, an I/O error.
                let e = match FsError::from(e) {
                    e if e.errno == libc::ESTALE => FsError::io(e.message),
                    e => e,
                };
                tracing::warn!("inode {}: cannot commit written data: {e}", state.ino);
                self.fail_writes(state, w, &e);
                return Err(e);
            }
        };
        w.done.clear();
        w.dirty = false;
        w.fresh = false;
        w.end = 0;
        w.fence = None;
        state.clear_held_attrs();
        state.mark_clean();
        // The page cache holds what was just written: that is this version.
        self.note_cached_version(&attr);
        state.remember(&attr);
        self.attrs.put(&attr);
        let mut cache = state.cache.lock().await;
        cache.size = attr.size;
        cache.invalidate();
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
    // Writing

    pub async fn write(&self, ino: Ino, offset: u64, data: Bytes) -> FsResult<u32> {
        let state = self.state_or_new(ino);
        let mut w = state.writer.lock().await;
        if let Some(e) = w.error.take() {
            // A stream of earlier writes failed: they are lost (and their writers told).
            self.fail_writes(&state, &mut w, &e);
        }
        if w.fence.is_none() {
            w.fence = self.meta.fence(ino);
        }
        let len = data.len();
        let mut pos = 0usize;
        while pos < len {
            let at = offset + pos as u64;
            let chunk = at / self.chunk_size;
            let within = at % self.chunk_size;
            let n = (len - pos).min((self.chunk_size - within) as usize);
            match self
                .write_segment(&state, &mut w, chunk, within, data.slice(pos..pos + n))
                .await
            {
                Ok(()) => {}
                // Nothing of this part was taken: what came before stands (a short write).
                Err(SegmentError::Refused(e)) if pos > 0 => {
                    tracing::debug!("inode {ino}: short write of {pos} of {len} bytes: {e}");
                    return Ok(pos as u32);
                }
                Err(SegmentError::Refused(e)) => return Err(e),
                Err(SegmentError::Lost(e)) => {
                    self.fail_writes(&state, &mut w, &e);
                    return Err(e);
                }
            }
            pos += n;
            state.written();
            w.last_write = std::time::Instant::now();
            w.dirty = true;
            w.end = w.end.max(at + n as u64);
            state.mark_dirty(at + n as u64);
        }
        if w.done.len() >= COMMIT_EVERY {
            // Long writes commit as they go, so the metaserver's view and memory stay bounded.
            let request = CommitWrite {
                ino,
                pieces: w.done.clone(),
                min_size: 0,
                attrs: Default::default(),
                id: CommitId::default(),
                fence: self.meta.fence_for_commit(w.fence),
            };
            match self.meta.commit(request).await {
                Ok(_) => {
                    w.done.clear();
                    state.cache.lock().await.invalidate();
                }
                Err(e) => tracing::debug!("inode {ino}: intermediate commit deferred: {e}"),
            }
        }
        Ok(len as u32)
    }

    async fn write_segment(
        &self,
        state: &InodeState,
        w: &mut Writer,
        chunk: u64,
        within: u64,
        data: Bytes,
    ) -> Result<(), SegmentError> {
        if !w.open.contains_key(&chunk) {
            let opened = self.open_chunk(state, w, chunk).await;
            if let Some(e) = w.error.take() {
                // Settling finished streams to make room found one that failed.
                return Err(SegmentError::Lost(e));
            }
            opened?;
        }
        w.clock += 1;
        let clock = w.clock;
        let oc = w.open.get_mut(&chunk).expect("chunk just opened");
        oc.last_use = clock;
        if oc.tx.send((within, data)).await.is_ok() {
            return Ok(());
        }
        // The stream task ended early, with the writes it had taken: its result says why.
        let oc = w.open.remove(&chunk).expect("chunk present");
        Err(SegmentError::Lost(match oc.task.await {
            Ok(Err(e)) => e,
            _ => FsError::io(format!(
                "inode {}: stream for piece {} ended unexpectedly",
                state.ino, oc.alloc.piece
            )),
        }))
    }

    /// A place for a new piece of `chunk`, avoiding daemons this mount recently failed to
    /// reach (unless nothing else is left).
    async fn allocate(&self, ino: Ino, chunk: u64, exclude: Vec<u32>) -> FsResult<Allocation> {
        let mut avoid = exclude.clone();
        for n in self.storage.suspects() {
            if !avoid.contains(&n) {
                avoid.push(n);
            }
        }
        let first = self
            .meta
            .call(AllocatePiece {
                ino,
                chunk,
                exclude: avoid.clone(),
            })
            .await;
        let result = match first {
            // Suspects were all there was (no room elsewhere, or they hold the chunk being
            // rewritten, e.g. daemons back from a restart): try them after all.
            Err(e)
                if avoid.len() > exclude.len()
                    && matches!(
                        e.remote_kind(),
                        Some(ErrorKind::NoSpace | ErrorKind::StorageUnavailable)
                    ) =>
            {
                self.meta.call(AllocatePiece { ino, chunk, exclude }).await
            }
            other => other,
        };
        result.map_err(|e| {
            let e = FsError::from(e);
            tracing::warn!("inode {ino}: no place for chunk {chunk}: {e}");
            e
        })
    }

    /// Opens a stream to every daemon of the allocation that answers; None if none does.
    async fn start_copies(&self, alloc: &Allocation) -> (Vec<(NodeAddr, PieceStream)>, Vec<dfs_proto::RpcError>) {
        let starts = alloc.nodes.iter().map(|node| async move {
            let r = self
                .storage
                .start_piece(node, alloc.piece, alloc.base, self.timeouts.connect)
                .await;
            (node.clone(), r)
        });
        let mut streams = Vec::new();
        let mut errors = Vec::new();
        for (node, r) in futures_util::future::join_all(starts).await {
            match r {
                Ok(s) => streams.push((node, s)),
                Err(e) => {
                    if e.is_unavailable() {
                        self.storage.suspect(node.id);
                    }
                    errors.push(e);
                }
            }
        }
        (streams, errors)
    }

    /// Starts the streams of a new piece for `chunk`. `Lost` if making room meant a commit
    /// that failed (the writes it carried are gone), `Refused` if no place could be found.
    async fn open_chunk(&self, state: &InodeState, w: &mut Writer, chunk: u64) -> Result<(), SegmentError> {
        let ino = state.ino;
        if w.open.len() >= MAX_OPEN_CHUNKS
            && let Some(victim) = w.least_recent()
        {
            w.close_chunk(victim);
        }
        while w.closing.len() > MAX_CLOSING_CHUNKS {
            w.settle_one().await;
        }
        if w.has_pending(chunk) {
            // Back to a chunk whose new piece is written but not committed: commit it first,
            // so that the next piece starts from it (copy-on-write of the committed piece).
            self.commit(state, w, "rewrite of a pending chunk")
                .await
                .map_err(SegmentError::Lost)?;
        }
        // The piece set aside at create has no base: it is right only while chunk 0 is known
        // to be empty (another mount may have written it since, e.g. between two lock holders).
        let first_piece = match w.first_piece.take() {
            Some(a) if chunk == 0 => {
                let cache = state.cache.lock().await;
                (cache.windows.contains(&0) && !cache.chunks.contains_key(&0)).then_some(a)
            }
            other => {
                w.first_piece = other;
                None
            }
        };
        let mut alloc = match first_piece {
            Some(a) => a,
            None => self.allocate(ino, chunk, vec![]).await?,
        };
        let mut exclude = Vec::new();
        let mut base_lookups = 0;
        let streams = loop {
            let (streams, errors) = self.start_copies(&alloc).await;
            for e in &errors {
                tracing::warn!("inode {ino}: chunk {chunk}: {e}");
            }
            if !streams.is_empty() {
                if streams.len() < alloc.replicas as usize {
                    tracing::warn!(
                        "inode {ino}: chunk {chunk} (piece {}) is written with {} of {} copies; the metaserver will add the rest",
                        alloc.piece,
                        streams.len(),
                        alloc.replicas
                    );
                }
                break streams;
            }
            // The base named by the allocation is gone from every daemon offered (moved, or
            // rewritten by another mount since): ask where the chunk lives now.
            let base_gone = alloc.base.is_some()
                && !errors.is_empty()
                && errors.iter().all(|e| e.remote_kind() == Some(ErrorKind::NotFound));
            if base_gone && base_lookups < 3 {
                base_lookups += 1;
                tracing::info!("inode {ino}: chunk {chunk} moved since it was located; locating it again");
                alloc = self.allocate(ino, chunk, exclude.clone()).await?;
                continue;
            }
            let unavailable = errors.iter().all(|e| e.is_unavailable());
            if unavailable && alloc.base.is_none() && exclude.len() < 6 {
                exclude.extend(alloc.nodes.iter().map(|n| n.id));
                tracing::warn!("inode {ino}: placing chunk {chunk} elsewhere");
                alloc = self.allocate(ino, chunk, exclude.clone()).await?;
                continue;
            }
            let e = match errors.into_iter().next() {
                Some(e) => FsError::from(e),
                None => FsError::io(format!("inode {ino}: no storage daemon offered for chunk {chunk}")),
            };
            tracing::warn!("inode {ino}: cannot write chunk {chunk}: {e}");
            return Err(e.into());
        };
        let (tx, rx) = mpsc::channel(SEGMENT_QUEUE);
        let task = tokio::spawn(stream_copies(
            streams,
            rx,
            self.timeouts.data,
            alloc.piece,
            self.storage.clone(),
        ));
        w.open.insert(
            chunk,
            OpenChunk {
                alloc,
                tx,
                task,
                last_use: w.clock,
            },
        );
        Ok(())
    }

    // ------------------------------------------------------------------------------------------
    // Reading

    /// Locations of chunks `first..=last` and the file size, fetching what is not cached.
    async fn locate(
        &self,
        state: &InodeState,
        first: u64,
        last: u64,
        want_end: u64,
    ) -> FsResult<(u64, Vec<Option<ChunkLocation>>)> {
        let mut cache = state.cache.lock().await;
        if state.take_stale_cache() {
            cache.invalidate();
            cache.size = 0;
        }
        let window = CHUNK_WINDOW as u64;
        // A read past the known end may be of data another mount appended: look again.
        let mut refresh_size = want_end > cache.size;
        for w in first / window..=last / window {
            if cache.windows.contains(&w) && !refresh_size {
                continue;
            }
            let reply = self
                .meta
                .call(ChunkMap {
                    ino: state.ino,
                    first: w * window,
                    count: CHUNK_WINDOW,
                })
                .await?;
            cache.size = state.visible_size(reply.attr.size);
            cache.fill(w, reply.chunks);
            refresh_size = false;
        }
        let locations = (first..=last).map(|c| cache.chunks.get(&c).cloned()).collect();
        Ok((cache.size, locations))
    }

    /// Reads from one copy of a piece: those on daemons believed up first, and among them those
    /// this mount has not recently failed to reach. A copy that fails (unreachable, too slow,
    /// damaged) is skipped for the next one. Returns the bytes read and the daemon that served.
    async fn read_copy(
        &self,
        ino: Ino,
        loc: &ChunkLocation,
        offset: u64,
        want: usize,
        out: &mut Vec<u8>,
    ) -> FsResult<(usize, NodeAddr)> {
        let suspects = self.storage.suspects();
        // Daemons the metaserver knows are down are not tried: the read fails at once.
        let mut order: Vec<&NodeAddr> = loc.nodes.iter().filter(|n| n.up).collect();
        // Different pieces start at different copies, so reads spread over the daemons.
        if !order.is_empty() {
            let len = order.len();
            order.rotate_left((loc.piece % len as u64) as usize);
        }
        order.sort_by_key(|n| suspects.contains(&n.id));
        let mark = out.len();
        let mut last_error = None;
        for node in order {
            match self
                .storage
                .read_into(node, loc.piece, offset, want, out, self.timeouts.request)
                .await
            {
                Ok(n) => return Ok((n, node.clone())),
                Err(e) => {
                    out.truncate(mark);
                    self.storage.suspect(node.id);
                    tracing::warn!(
                        "inode {ino}: chunk {} from {node}: {}; trying another copy",
                        loc.chunk,
                        e.message
                    );
                    last_error = Some(e);
                }
            }
        }
        Err(match last_error {
            Some(e) if loc.nodes.iter().any(|n| n.up) => FsError::new(e.errno, format!("inode {ino}: {}", e.message)),
            _ => storage_down(ino, loc),
        })
    }

    pub async fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let state = self.state_or_new(ino);
        if state.is_dirty() {
            // Reads see this mount's own writes: commit them first. If that fails, the writes
            // are gone (their writers hear of it) and the read sees what is stored.
            let mut w = state.writer.lock().await;
            let _ = self.commit(&state, &mut w, "read").await;
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let cs = self.chunk_size;
        let want_end = offset.saturating_add(size as u64);
        let (first, last) = (offset / cs, (want_end - 1) / cs);
        let (file_size, locations) = self.locate(&state, first, last, want_end).await?;
        let end = want_end.min(file_size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, loc) in locations.iter().enumerate() {
            let chunk = first + i as u64;
            let chunk_start = chunk * cs;
            let a = offset.max(chunk_start);
            let b = end.min(chunk_start + cs);
            if a >= b {
                continue;
            }
            // Bytes of this chunk the piece holds; holes and the rest of the range read as zeros.
            let valid_end = match loc {
                Some(loc) => b.min(chunk_start + loc.len),
                None => a,
            };
            if let Some(loc) = loc.as_ref().filter(|_| a < valid_end) {
                let want = (valid_end - a) as usize;
                let mut result = self.read_copy(ino, loc, a - chunk_start, want, &mut out).await;
                if result.is_err() {
                    // Ask the metaserver where the data lives now: the copies this mount knew
                    // may have moved (rebalancing, drain, repair) since it asked.
                    state.cache.lock().await.invalidate();
                    let fresh = self.locate(&state, chunk, chunk, want_end).await;
                    if let Ok((_, fresh)) = fresh
                        && let Some(Some(now)) = fresh.into_iter().next()
                        && (now.piece != loc.piece || now.nodes != loc.nodes)
                        && now.len >= loc.len
                    {
                        tracing::info!("inode {ino}: chunk {chunk} moved; reading its new location");
                        result = self.read_copy(ino, &now, a - chunk_start, want, &mut out).await;
                    }
                }
                match result {
                    Ok((got, node)) if got < want => tracing::warn!(
                        "inode {ino}: piece {} on {node} is shorter than recorded ({got} of {want} bytes); the rest reads as zeros",
                        loc.piece,
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        // Next time, ask the metaserver where (and whether) the data lives.
                        state.cache.lock().await.invalidate();
                        return Err(e);
                    }
                }
            }
            out.resize((b - offset) as usize, 0);
        }
        Ok(out)
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

/// Why a write could not queue a segment.
enum SegmentError {
    /// Before anything was taken (no place for the chunk): earlier writes are unaffected.
    Refused(FsError),
    /// A stream that had taken earlier writes failed: they are lost.
    Lost(FsError),
}

/// Failures of placement (the default for `?`) take nothing that was written.
impl From<FsError> for SegmentError {
    fn from(e: FsError) -> Self {
        SegmentError::Refused(e)
    }
}

/// Feeds queued segments into a piece stream, then waits for the piece to be durable.
async fn stream_segments(
    mut stream: PieceStream,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    timeout: Duration,
) -> FsResult<u64> {
    while let Some((offset, data)) = rx.recv().await {
        stream.send_segment(offset, data, timeout).await?;
    }
    stream.finish(timeout).await
}

/// Feeds every copy of a piece the same segments (shared buffers, no copies) and waits for
/// each to be durable. A copy that fails is left behind; the piece is stored if at least one
/// copy is durable, and the metaserver re-makes the missing ones.
async fn stream_copies(
    streams: Vec<(NodeAddr, PieceStream)>,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    timeout: Duration,
    piece: dfs_proto::types::PieceId,
    storage: Arc<StoragePool>,
) -> FsResult<Stored> {
    let mut copies = Vec::new();
    for (node, stream) in streams {
        let (tx, copy_rx) = mpsc::channel(SEGMENT_QUEUE);
        copies.push((node, Some(tx), tokio::spawn(stream_segments(stream, copy_rx, timeout))));
    }
    while let Some(segment) = rx.recv().await {
        for (node, tx, _) in copies.iter_mut() {
            if let Some(sender) = tx
                && sender.send(segment.clone()).await.is_err()
            {
                // That copy's stream failed; its error is collected below.
                tracing::debug!("piece {piece}: copy on {node} stopped taking data");
                *tx = None;
            }
        }
    }
    let mut stored = Stored {
        len: 0,
        nodes: Vec::new(),
    };
    let mut first_error = None;
    let total = copies.len();
    for (node, tx, task) in copies {
        drop(tx);
        let outcome = task
            .await
            .unwrap_or_else(|e| Err(FsError::io(format!("piece {piece}: writer task failed: {e}"))));
        match outcome {
            Ok(len) if stored.nodes.is_empty() || len == stored.len => {
                stored.len = len;
                stored.nodes.push(node.id);
            }
            Ok(len) => {
                tracing::error!(
                    "piece {piece}: copy on {node} is {len} bytes, others {}: leaving it out",
                    stored.len
                );
            }
            Err(e) => {
                storage.suspect(node.id);
                tracing::warn!("piece {piece}: copy on {node} failed: {}", e.message);
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if stored.nodes.is_empty() => Err(e),
        Some(_) => {
            tracing::warn!(
                "piece {piece}: stored with {} of {total} copies; the metaserver will restore the rest",
                stored.nodes.len()
            );
            Ok(stored)
        }
        None => Ok(stored),
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
