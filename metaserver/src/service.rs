//! Request handlers: each maps one wire request onto queries (snapshots on the blocking pool),
//! committed operations, the registry and the sessions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dfs_proto::ErrorKind;
use dfs_proto::meta::*;
use dfs_proto::types::{Attr, FileKind, HandleId, Ino, NodeAddr, NodeId, PieceId, SessionId};
use redb::{Database, ReadableTable, ReadableTableMetadata};
use tokio::sync::Notify;

use crate::committer::Committer;
use crate::db::{Effects, ReadCtx, WriteCtx};
use crate::error::{MetaError, Result};
use crate::healer::HealerState;
use crate::locks::ClusterLocks;
use crate::metrics::MetaMetrics;
use crate::namespace::{self, NewNode};
use crate::registry::{NoDaemon, Registry};
use crate::schema::{ChunkRecord, NodeRecord, get_counter, keys};
use crate::sessions::Sessions;
use crate::wal::{WAL_FILE, Wal};

/// Piece ids are reserved on disk in blocks, so allocating one rarely needs a commit.
const PIECE_ID_BLOCK: u64 = 100_000;
/// Most chunk locations one `ChunkMap` reply carries.
const MAX_CHUNK_MAP: u32 = 1024;
/// Most deletions handed to a daemon per heartbeat.
const DELETES_PER_HEARTBEAT: usize = 2048;
/// Most pieces a daemon is asked to check for per heartbeat.
const CHECKS_PER_HEARTBEAT: usize = 8192;
/// An allocation not committed within this long is forgotten by placement.
const PENDING_MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Settings {
    pub chunk_size: u64,
    pub heartbeat_timeout: Duration,
    pub session_timeout: Duration,
    pub orphan_piece_grace: Duration,
    /// Cluster default replication factor.
    pub replicas: u8,
    pub dead_after: Duration,
    pub balance_threshold_percent: u64,
    pub copies_per_node: u32,
}

pub struct MetaService {
    metrics: MetaMetrics,
    pub(crate) db: Arc<Database>,
    committer: Committer,
    pub(crate) registry: Arc<Mutex<Registry>>,
    sessions: Arc<Mutex<Sessions>>,
    /// Woken after every transaction: opens waiting for a deletion's outcome look again.
    undoomed: Arc<Notify>,
    piece_ids: tokio::sync::Mutex<(PieceId, PieceId)>,
    inventories: Mutex<HashMap<NodeId, HashSet<PieceId>>>,
    reaper: Arc<Notify>,
    locks: Arc<ClusterLocks>,
    /// When commit answers kept for retries were last swept of the ones nobody settled.
    commits_swept: Mutex<Option<Instant>>,
    pub(crate) settings: Settings,
    pub(crate) healer: Mutex<HealerState>,
    /// Held by the scan under way (one at a time: two would plan the same copies twice).
    pub(crate) scanning: tokio::sync::Mutex<()>,
    /// Unreferenced pieces too young to delete when a daemon reported them: looked at again
    /// once the grace period has passed, so they are collected without waiting for the next
    /// inventory.
    pub(crate) young_unreferenced: Mutex<HashMap<(NodeId, PieceId), Instant>>,
    pub(crate) backups: Mutex<HashMap<u64, crate::backup::Snapshot>>,
    /// Per daemon: copies recorded there that its last inventory did not list, to be checked
    /// by the daemon (a piece committed while it was listing is there; one really absent is
    /// reported missing and its copy dropped).
    pub(crate) presence_checks: Mutex<HashMap<NodeId, PresenceCheck>>,
    /// Names batches of presence checks (never reused, so an old confirmation is never taken
    /// for a new batch).
    check_rounds: std::sync::atomic::AtomicU64,
    pub(crate) db_dir: std::path::PathBuf,
}

/// Copies a daemon is to check for, and the batch it was handed (with its round number)
/// until a heartbeat confirms it checked it.
#[derive(Debug, Default)]
pub(crate) struct PresenceCheck {
    queue: Vec<PieceId>,
    handed: Option<(u64, Vec<PieceId>)>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Data requests (placement, copies) are for regular files only.
fn regular_file(r: &ReadCtx, ino: Ino) -> Result<()> {
    if namespace::inode(r, ino)?.kind != FileKind::RegularFile {
        return Err(MetaError::fs(
            ErrorKind::InvalidArgument,
            format!("inode {ino} is not a regular file"),
        ));
    }
    Ok(())
}

fn stale_session(id: u64) -> MetaError {
    MetaError::fs(
        ErrorKind::Stale,
        format!("session {id} is unknown to the metaserver (restarted?)"),
    )
}

impl MetaService {
    /// Loads the in-memory view from the database and starts the commit thread.
    pub fn start(db: Arc<Database>, db_dir: std::path::PathBuf, mut settings: Settings) -> Result<Arc<Self>> {
        let leftovers = crate::backup::remove_leftover_snapshots(&db_dir);
        if leftovers > 0 {
            tracing::info!("removed {leftovers} backup snapshots an earlier run left unread");
        }
        // Before anything reads the database: it must hold every acknowledged batch.
        let wal = Wal::recover(&db, &db_dir.join(WAL_FILE))?;
        crate::committer::skip_unlogged_inode_numbers(&db)?;
        let r = ReadCtx::begin(&db)?;
        let stored_chunk = get_counter(&r.meta, keys::CHUNK_SIZE)?;
        if stored_chunk != settings.chunk_size {
            tracing::info!(
                "using chunk size {stored_chunk} fixed when this cluster was created (config says {})",
                settings.chunk_size
            );
            settings.chunk_size = stored_chunk;
        }
        let mut registry = Registry::new(settings.heartbeat_timeout).with_dead_after(settings.dead_after);
        for item in r.nodes.iter()? {
            let (id, value) = item?;
            let rec = NodeRecord::decode(id.value(), value.value())?;
            registry.load(id.value(), &rec, Instant::now());
        }
        for item in r.node_pieces.iter()? {
            let (key, value) = item?;
            registry.add_referenced(key.value().0, 1, value.value().2);
        }
        let limit = get_counter(&r.meta, keys::PIECE_ID_LIMIT)?;
        let mut stored_sessions = HashSet::new();
        for item in r.sessions.iter()? {
            stored_sessions.insert(item?.0.value());
        }
        drop(r);
        if !stored_sessions.is_empty() {
            tracing::info!(
                "waiting for {} mount sessions from before the restart to resume before deleting unlinked files",
                stored_sessions.len()
            );
        }
        let registry = Arc::new(Mutex::new(registry));
        let started = Instant::now();
        let sessions = Arc::new(Mutex::new(Sessions::new(
            settings.session_timeout,
            stored_sessions,
            started,
        )));
        let reaper = Arc::new(Notify::new());
        let undoomed = Arc::new(Notify::new());
        let metrics = MetaMetrics::default();
        let committer = {
            let registry = registry.clone();
            let reaper = reaper.clone();
            let sessions = sessions.clone();
            let sessions_done = sessions.clone();
            let undoomed_done = undoomed.clone();
            Committer::start(
                db.clone(),
                Some(wal),
                move |effects: Option<Effects>| {
                    // Opens of inodes this transaction deleted may now look (and not find them).
                    lock(&sessions_done).clear_doomed();
                    undoomed_done.notify_waiters();
                    let Some(effects) = effects else { return };
                    lock(&registry).apply(&effects);
                    if effects.orphaned {
                        reaper.notify_one();
                    }
                },
                // Just after a restart, open files are not known until mounts resume.
                move |ino| lock(&sessions).doom_if_closed(ino, Instant::now()),
                metrics.commit.clone(),
            )
        };
        Ok(Arc::new(MetaService {
            db,
            committer,
            registry,
            sessions,
            undoomed,
            piece_ids: tokio::sync::Mutex::new((limit, limit)),
            inventories: Mutex::new(HashMap::new()),
            reaper,
            locks: Arc::new(ClusterLocks::default()),
            commits_swept: Mutex::new(None),
            settings,
            healer: Mutex::new(HealerState::default()),
            scanning: tokio::sync::Mutex::new(()),
            young_unreferenced: Mutex::new(HashMap::new()),
            backups: Mutex::new(HashMap::new()),
            presence_checks: Mutex::new(HashMap::new()),
            check_rounds: std::sync::atomic::AtomicU64::new(0),
            db_dir,
            metrics,
        }))
    }

    /// What this metaserver measures about itself (registered by `main` when served).
    pub fn metrics(&self) -> &MetaMetrics {
        &self.metrics
    }

    pub fn chunk_size(&self) -> u64 {
        self.settings.chunk_size
    }

    /// Runs a query on a consistent snapshot, off the async threads.
    /// Runs a bounded query (a few point lookups or one page of a range) right here: a
    /// transaction that reads cached pages takes microseconds, less than handing it to
    /// another thread and waking this one again. Scans go through [`MetaService::read`].
    pub(crate) fn read_now<T>(&self, f: impl FnOnce(&ReadCtx) -> Result<T>) -> Result<T> {
        f(&ReadCtx::begin(&self.db)?)
    }

    /// Runs a query that may scan (a whole table or a node's pieces) on the blocking pool.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&ReadCtx::begin(&db)?))
            .await
            .map_err(|e| MetaError::CommitFailed(format!("query task failed: {e}")))?
    }

    pub(crate) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut WriteCtx<'t>) -> Result<T> + Send + 'static,
    {
        self.committer.write(op).await
    }

    /// Runs `op` in the next transaction and also returns what it changed.
    async fn write_with_changes<T, F>(&self, op: F) -> Result<(T, Changes)>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut WriteCtx<'t>) -> Result<T> + Send + 'static,
    {
        self.committer
            .write(move |ctx| {
                let mark = ctx.touched.len();
                let value = op(ctx)?;
                Ok((value, ctx.changes_since(mark)))
            })
            .await
    }

    /// Like [`write_with_changes`](Self::write_with_changes), answered before the batch is
    /// durable (`Committer::write_early`).
    async fn write_with_changes_early<T, F>(&self, op: F) -> Result<(T, Changes)>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut WriteCtx<'t>) -> Result<T> + Send + 'static,
    {
        self.committer
            .write_early(move |ctx| {
                let mark = ctx.touched.len();
                let value = op(ctx)?;
                Ok((value, ctx.changes_since(mark)))
            })
            .await
    }

    /// Durable once answered, like every normal write: the log's fdatasync of this batch
    /// covers the early-answered creates before it.
    pub async fn sync_creates(&self, req: SyncCreates) -> Result<Vec<Ino>> {
        if req.inos.len() > MAX_SYNC_CREATES {
            return Err(MetaError::fs(
                ErrorKind::InvalidArgument,
                format!(
                    "{} inodes in one SyncCreates (at most {MAX_SYNC_CREATES})",
                    req.inos.len()
                ),
            ));
        }
        self.write(move |ctx| {
            let mut missing = Vec::new();
            for ino in req.inos {
                if crate::schema::get_inode(crate::db::Tables::inodes(ctx), ino)?.is_none() {
                    missing.push(ino);
                }
            }
            Ok(missing)
        })
        .await
    }

    async fn next_piece_id(&self) -> Result<PieceId> {
        let mut ids = self.piece_ids.lock().await;
        if ids.0 >= ids.1 {
            let limit = self
                .write(|ctx| {
                    let limit = get_counter(ctx.meta.table(), keys::PIECE_ID_LIMIT)? + PIECE_ID_BLOCK;
                    ctx.meta.insert(keys::PIECE_ID_LIMIT, limit)?;
                    Ok(limit)
                })
                .await?;
            *ids = (ids.0.max(limit - PIECE_ID_BLOCK), limit);
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id)
    }

    /// The daemons for a new piece's copies. Just after a restart, while daemons known from
    /// before have not reported yet, waits for them rather than failing (or placing every copy
    /// on the first daemon back).
    async fn choose_nodes(&self, count: usize, exclude: &[NodeId]) -> Result<Vec<NodeId>, NoDaemon> {
        // Bounded well below a client's request timeout, so the client does not give up on a
        // request the metaserver then carries out.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let now = Instant::now();
            let (choice, waiting) = {
                let registry = lock(&self.registry);
                (
                    registry.choose_many(count, &[], exclude, self.settings.chunk_size, now),
                    registry.awaiting_reports(now) && now < deadline,
                )
            };
            match choice {
                Err(_) if waiting => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(nodes) if nodes.len() < count && waiting => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
    }

    /// A new piece for a chunk that holds no data yet, on the daemons placement picks.
    async fn allocate_new(&self, chunk: u64, exclude: &[NodeId], replicas: u8) -> Result<Allocation> {
        let nodes = self
            .choose_nodes(replicas as usize, exclude)
            .await
            .map_err(|e| MetaError::fs(ErrorKind::NoSpace, e.to_string()))?;
        let piece = self.next_piece_id().await?;
        let now = Instant::now();
        let mut registry = lock(&self.registry);
        // Beyond the first chunk a file is large: expect a full chunk. A first chunk may be a
        // small file, and only counts as a piece.
        let expected = if chunk == 0 { 0 } else { self.settings.chunk_size };
        for &node in &nodes {
            registry.note_pending(piece, node, expected, now);
        }
        if nodes.len() < replicas as usize {
            tracing::warn!(
                "piece {piece} starts with {} of {replicas} copies: not enough storage daemons can take data",
                nodes.len()
            );
        }
        Ok(Allocation {
            chunk,
            piece,
            nodes: nodes.iter().map(|&n| registry.addr(n, now)).collect(),
            base: None,
            replicas,
        })
    }

    fn location(&self, chunk: u64, c: ChunkRecord, now: Instant) -> ChunkLocation {
        let registry = lock(&self.registry);
        let mut nodes: Vec<NodeAddr> = c.nodes.iter().map(|&n| registry.addr(n, now)).collect();
        // Up first, and among those the daemons staying in the cluster.
        nodes.sort_by_key(|n| (!n.up, registry.node(n.id).is_some_and(|s| s.draining)));
        ChunkLocation {
            chunk,
            piece: c.piece,
            len: c.len,
            nodes,
        }
    }

    // ------------------------------------------------------------------------------------------
    // Sessions

    pub async fn open_session(&self, req: OpenSession) -> Result<SessionInfo> {
        let opened = lock(&self.sessions).open_session(req.client.clone(), req.resume, &req.open_files, Instant::now());
        // Stored before answering: after a crash, this mount is awaited.
        self.write(move |ctx| {
            if let Some(old) = opened.replaces {
                ctx.sessions.remove(old)?;
            }
            ctx.sessions.insert(opened.session, ())?;
            Ok(())
        })
        .await?;
        if let Some(old) = opened.replaces {
            self.locks.release_session(old);
        }
        let (holds, lost) = self.locks.reclaim(opened.session, &req.locks);
        for (ino, range) in lost {
            tracing::error!(
                "{} lost its lock on bytes {}..={} of inode {ino}: another mount took it while the session was away",
                req.client,
                range.start,
                range.end
            );
        }
        tracing::info!(
            "session {} opened by {} ({} open files, {} locks)",
            opened.session,
            req.client,
            req.open_files.len(),
            req.locks.len()
        );
        Ok(SessionInfo {
            session: opened.session,
            holds,
            chunk_size: self.settings.chunk_size,
            keepalive_ms: (self.settings.session_timeout.as_millis() / 4).max(200) as u32,
        })
    }

    pub async fn close_session(&self, req: CloseSession) -> Result<()> {
        self.locks.release_session(req.session);
        if lock(&self.sessions).close_session(req.session) {
            tracing::info!("session {} closed", req.session);
            self.reaper.notify_one();
        }
        let id = req.session;
        self.write(move |ctx| {
            ctx.sessions.remove(id)?;
            Ok(())
        })
        .await
    }

    pub async fn keep_alive(&self, req: KeepAlive) -> Result<()> {
        if lock(&self.sessions).renew(req.session, Instant::now()) {
            Ok(())
        } else {
            Err(stale_session(req.session))
        }
    }

    // ------------------------------------------------------------------------------------------
    // Namespace

    pub async fn lookup(&self, req: Lookup) -> Result<Attr> {
        self.read_now(|r| namespace::lookup(r, req.parent, &req.name))
    }

    pub async fn get_attr(&self, req: GetAttr) -> Result<Attr> {
        self.read_now(|r| namespace::get_attr(r, req.ino))
    }

    pub async fn read_dir(&self, req: ReadDir) -> Result<DirPage> {
        self.read_now(|r| namespace::read_dir(r, req.dir, req.after.as_deref(), req.limit))
    }

    pub async fn read_link(&self, req: ReadLink) -> Result<Vec<u8>> {
        self.read_now(|r| namespace::read_link(r, req.ino))
    }

    pub async fn make_node(&self, req: MakeNode) -> Result<NewEntry> {
        let (attr, changes) = self
            .write_with_changes(move |ctx| {
                let (ino, rec) = namespace::make_node(
                    ctx,
                    &NewNode {
                        parent: req.parent,
                        name: &req.name,
                        kind: req.kind,
                        perm: req.perm,
                        uid: req.uid,
                        gid: req.gid,
                        rdev: req.rdev,
                        target: &req.target,
                    },
                )?;
                Ok(rec.attr(ino))
            })
            .await?;
        Ok(NewEntry { attr, changes })
    }

    pub async fn create(&self, req: Create) -> Result<Created> {
        let session = req.session;
        self.release_all(session, &req.released)?;
        let now = Instant::now();
        if !lock(&self.sessions).renew(session, now) {
            return Err(stale_session(session));
        }
        let no_room = self.choose_nodes(1, &[]).await.err();
        let sessions = self.sessions.clone();
        let default_replicas = self.settings.replicas;
        let ((attr, created, replicas, open_elsewhere), changes) = self
            .write_with_changes_early(move |ctx| {
                if let Some(reason) = no_room {
                    // Opening an existing file needs no daemon; creating one that nothing could
                    // be written into does.
                    dfs_proto::names::validate_name(&req.name)?;
                    if namespace::child(ctx, req.parent, &req.name)?.is_none() {
                        return Err(MetaError::fs(ErrorKind::NoSpace, reason.to_string()));
                    }
                }
                let created =
                    namespace::create_file(ctx, req.parent, &req.name, req.perm, req.uid, req.gid, req.exclusive)?;
                // Registered in the same step as the create: no unlink can slip in between and
                // delete the file as closed. (A session that expired meanwhile is re-declared by
                // the mount when it resumes.)
                let open_elsewhere = {
                    let mut sessions = lock(&sessions);
                    sessions.open(session, req.handle, created.0.ino, Instant::now());
                    sessions.open_elsewhere(session, created.0.ino)
                };
                let replicas = namespace::replicas_of(ctx, created.0.ino, default_replicas)?;
                Ok((created.0, created.1, replicas, open_elsewhere))
            })
            .await?;
        let first_piece = if created {
            self.allocate_new(0, &[], replicas).await.ok()
        } else {
            None
        };
        Ok(Created {
            attr,
            created,
            first_piece,
            changes,
            open_elsewhere,
        })
    }

    pub async fn open(&self, req: Open) -> Result<Opened> {
        let ino = req.ino;
        self.release_all(req.session, &req.released)?;
        // An open must not slip between a transaction deciding to delete the inode (nothing had
        // it open) and that transaction becoming durable: it would find the inode in the old
        // snapshot, and its reads would then fail. It waits for the outcome instead.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let outcome = {
                let mut sessions = lock(&self.sessions);
                if sessions.is_doomed(ino) {
                    Some(self.undoomed.notified())
                } else if sessions.open(req.session, req.handle, ino, Instant::now()) {
                    None
                } else {
                    return Err(stale_session(req.session));
                }
            };
            let Some(undoomed) = outcome else { break };
            if tokio::time::timeout_at(deadline, undoomed).await.is_err() {
                return Err(MetaError::CommitFailed(format!(
                    "inode {ino} is being deleted and the deletion did not complete"
                )));
            }
        }
        let result = self.read_now(|r| {
            let attr = namespace::get_attr(r, ino)?;
            let chunks = if attr.kind == FileKind::RegularFile {
                namespace::chunk_range(r, ino, 0, CHUNK_WINDOW as u64 - 1)?
            } else {
                vec![]
            };
            Ok((attr, chunks))
        });
        match result {
            Ok((attr, chunks)) => {
                let now = Instant::now();
                let chunks = chunks.into_iter().map(|(i, c)| self.location(i, c, now)).collect();
                let open_elsewhere = lock(&self.sessions).open_elsewhere(req.session, ino);
                Ok(Opened {
                    attr,
                    chunks,
                    open_elsewhere,
                })
            }
            Err(e) => {
                lock(&self.sessions).release(req.session, req.handle, Instant::now());
                Err(e)
            }
        }
    }

    pub async fn release(&self, req: Release) -> Result<()> {
        if lock(&self.sessions).release(req.session, req.handle, Instant::now()) {
            // Possibly the last close of an unlinked file.
            self.reaper.notify_one();
        }
        Ok(())
    }

    pub async fn release_handles(&self, req: ReleaseHandles) -> Result<()> {
        self.release_all(req.session, &req.handles)
    }

    #[cfg(test)]
    pub(crate) fn is_open(&self, ino: Ino) -> bool {
        lock(&self.sessions).is_open(ino)
    }

    /// Releases handles of `session` closed on its mount (sent alone or with a create or open).
    fn release_all(&self, session: SessionId, handles: &[(HandleId, Ino)]) -> Result<()> {
        if handles.is_empty() {
            return Ok(());
        }
        if handles.len() > MAX_RELEASE_BATCH {
            return Err(MetaError::fs(
                ErrorKind::InvalidArgument,
                format!("{} handles in one release (at most {MAX_RELEASE_BATCH})", handles.len()),
            ));
        }
        let now = Instant::now();
        let mut last_close = false;
        {
            let mut sessions = lock(&self.sessions);
            for &(handle, _) in handles {
                last_close |= sessions.release(session, handle, now);
            }
        }
        if last_close {
            // Possibly the last close of an unlinked file.
            self.reaper.notify_one();
        }
        Ok(())
    }

    pub async fn set_attr(&self, req: SetAttr) -> Result<Attr> {
        let chunk_size = self.settings.chunk_size;
        self.write(move |ctx| namespace::set_attr(ctx, &req, chunk_size)).await
    }

    pub async fn unlink(&self, req: Unlink) -> Result<Changes> {
        let ((), changes) = self
            .write_with_changes(move |ctx| namespace::unlink(ctx, req.parent, &req.name))
            .await?;
        Ok(changes)
    }

    pub async fn remove_dir(&self, req: RemoveDir) -> Result<Changes> {
        let ((), changes) = self
            .write_with_changes(move |ctx| namespace::remove_dir(ctx, req.parent, &req.name))
            .await?;
        Ok(changes)
    }

    pub async fn rename(&self, req: Rename) -> Result<Changes> {
        let ((), changes) = self
            .write_with_changes(move |ctx| {
                namespace::rename(ctx, req.parent, &req.name, req.new_parent, &req.new_name, req.mode)
            })
            .await?;
        Ok(changes)
    }

    pub async fn link(&self, req: Link) -> Result<NewEntry> {
        let (attr, changes) = self
            .write_with_changes(move |ctx| namespace::link(ctx, req.ino, req.new_parent, &req.new_name))
            .await?;
        Ok(NewEntry { attr, changes })
    }

    pub async fn get_xattr(&self, req: GetXattr) -> Result<Vec<u8>> {
        self.read_now(|r| namespace::get_xattr(r, req.ino, &req.name))
    }

    pub async fn list_xattr(&self, req: ListXattr) -> Result<Vec<Vec<u8>>> {
        self.read_now(|r| namespace::list_xattrs(r, req.ino))
    }

    pub async fn set_xattr(&self, req: SetXattr) -> Result<Attr> {
        self.write(move |ctx| namespace::set_xattr(ctx, req.ino, &req.name, &req.value, req.mode))
            .await
    }

    pub async fn remove_xattr(&self, req: RemoveXattr) -> Result<Attr> {
        self.write(move |ctx| namespace::remove_xattr(ctx, req.ino, &req.name))
            .await
    }

    // ------------------------------------------------------------------------------------------
    // Locks

    pub async fn set_lock(&self, req: SetLock) -> Result<LockOutcome> {
        if !lock(&self.sessions).renew(req.owner.session, Instant::now()) {
            return Err(stale_session(req.owner.session));
        }
        if req.start > req.end {
            return Err(MetaError::fs(
                ErrorKind::InvalidArgument,
                "lock range ends before it starts",
            ));
        }
        Ok(self.locks.set(&req).await)
    }

    pub async fn test_lock(&self, req: TestLock) -> Result<Option<dfs_proto::locks::Conflict>> {
        Ok(self.locks.test(&req))
    }

    // ------------------------------------------------------------------------------------------
    // Data placement

    pub async fn chunk_map(&self, req: ChunkMap) -> Result<ChunkMapReply> {
        let count = req.count.clamp(1, MAX_CHUNK_MAP) as u64;
        let (attr, chunks) = self.read_now(|r| {
            let attr = namespace::get_attr(r, req.ino)?;
            let last = req.first.saturating_add(count - 1);
            Ok((attr, namespace::chunk_range(r, req.ino, req.first, last)?))
        })?;
        let now = Instant::now();
        let chunks = chunks.into_iter().map(|(i, c)| self.location(i, c, now)).collect();
        Ok(ChunkMapReply {
            attr,
            chunk_size: self.settings.chunk_size,
            chunks,
        })
    }

    pub async fn allocate_piece(&self, req: AllocatePiece) -> Result<Allocation> {
        let (ino, chunk) = (req.ino, req.chunk);
        let default_replicas = self.settings.replicas;
        let (existing, replicas) = self.read_now(|r| {
            regular_file(r, ino)?;
            Ok((
                namespace::chunk(r, ino, chunk)?,
                namespace::replicas_of(r, ino, default_replicas)?,
            ))
        })?;
        let Some(base) = existing else {
            return self.allocate_new(chunk, &req.exclude, replicas).await;
        };
        // A rewrite copies the existing piece, so its copies are made by the daemons holding
        // it (each from its own copy).
        let len = base.len;
        self.allocate_from(ino, chunk, chunk, base, len, &req.exclude, replicas)
            .await
    }

    /// A new piece for chunk `chunk` of `ino` made by the daemons holding chunk `src_chunk` of
    /// `src_ino`, each copying the first `len` bytes of its own copy (copy_file_range: the
    /// bytes go from daemon to daemon's disk, never through the client).
    pub async fn allocate_copy(&self, req: AllocateCopy) -> Result<Allocation> {
        let default_replicas = self.settings.replicas;
        let (source, replicas) = self.read_now(|r| {
            regular_file(r, req.src_ino)?;
            regular_file(r, req.ino)?;
            Ok((
                namespace::chunk(r, req.src_ino, req.src_chunk)?,
                namespace::replicas_of(r, req.ino, default_replicas)?,
            ))
        })?;
        let Some(source) = source else {
            return Err(MetaError::fs(
                ErrorKind::NotFound,
                format!("chunk {} of inode {} holds no data to copy", req.src_chunk, req.src_ino),
            ));
        };
        let len = req.len.min(source.len);
        self.allocate_from(
            req.src_ino,
            req.src_chunk,
            req.chunk,
            source,
            len,
            &req.exclude,
            replicas,
        )
        .await
    }

    /// A new piece for `chunk` starting as a copy of the first `len` bytes of `base` (chunk
    /// `base_chunk` of `base_ino`), made by the daemons holding `base`. Fewer of them than the
    /// factor: the repair adds the rest.
    #[allow(clippy::too_many_arguments)]
    async fn allocate_from(
        &self,
        base_ino: Ino,
        base_chunk: u64,
        chunk: u64,
        base: ChunkRecord,
        len: u64,
        exclude: &[NodeId],
        replicas: u8,
    ) -> Result<Allocation> {
        let now = Instant::now();
        let usable = |allow_draining: bool| -> Vec<NodeAddr> {
            let registry = lock(&self.registry);
            base.nodes
                .iter()
                .map(|&n| registry.addr(n, now))
                .filter(|a| a.up && !exclude.contains(&a.id))
                .filter(|a| allow_draining || !registry.node(a.id).is_some_and(|s| s.draining))
                .take(replicas as usize)
                .collect()
        };
        let mut nodes = usable(false);
        if nodes.is_empty() {
            nodes = usable(true);
        }
        if nodes.is_empty() {
            let holders: Vec<String> = {
                let registry = lock(&self.registry);
                base.nodes.iter().map(|&n| registry.addr(n, now).to_string()).collect()
            };
            return Err(MetaError::fs(
                ErrorKind::StorageUnavailable,
                format!(
                    "chunk {base_chunk} of inode {base_ino} is on storage daemons [{}], none of them up and reachable from the client",
                    holders.join(", ")
                ),
            ));
        }
        let piece = self.next_piece_id().await?;
        {
            let mut registry = lock(&self.registry);
            for n in &nodes {
                registry.note_pending(piece, n.id, len, now);
            }
        }
        Ok(Allocation {
            chunk,
            piece,
            nodes,
            base: Some(BasePiece { piece: base.piece, len }),
            replicas,
        })
    }

    pub async fn deallocate(&self, req: Deallocate) -> Result<Attr> {
        self.write(move |ctx| namespace::deallocate(ctx, req.ino, req.first, req.last))
            .await
    }

    pub async fn commit_write(&self, req: CommitWrite) -> Result<Attr> {
        let chunk_size = self.settings.chunk_size;
        let locks = self.locks.clone();
        self.write(move |ctx| {
            // Checked in the transaction: writes made under a lock land only while it is held,
            // never after the next holder's (the lease was lost with an expired session).
            let fenced = || match req.fence {
                Some(f) if !locks.still_held(f.session, req.ino, f.hold) => Err(MetaError::fs(
                    ErrorKind::Stale,
                    format!(
                        "inode {}: the lock these writes were made under was lost before they were committed \
                         (session {} expired, or the metaserver restarted)",
                        req.ino, f.session
                    ),
                )),
                _ => Ok(()),
            };
            namespace::commit_write_once(
                ctx,
                req.id,
                fenced,
                req.ino,
                &req.pieces,
                req.pieces_in_flight,
                req.min_size,
                &req.attrs,
                chunk_size,
            )
        })
        .await
    }

    pub async fn retract_write(&self, req: RetractWrite) -> Result<Attr> {
        if req.copies.len() > MAX_RETRACTED {
            return Err(MetaError::fs(
                ErrorKind::InvalidArgument,
                format!(
                    "{} chunks in one RetractWrite (at most {MAX_RETRACTED})",
                    req.copies.len()
                ),
            ));
        }
        tracing::info!(
            "inode {}: withdrawing {} copies its mount could not make durable",
            req.ino,
            req.copies.iter().map(|(_, _, nodes)| nodes.len()).sum::<usize>()
        );
        self.write(move |ctx| namespace::retract_write(ctx, req.ino, &req.copies, req.size))
            .await
    }

    // ------------------------------------------------------------------------------------------
    // Cluster

    pub async fn stat_fs(&self, _req: StatFs) -> Result<FsStats> {
        let inodes = self
            .read(|r| {
                Ok(get_counter(&r.meta, keys::FILES)?
                    + get_counter(&r.meta, keys::DIRECTORIES)?
                    + get_counter(&r.meta, keys::SYMLINKS)?)
            })
            .await?;
        let (capacity_bytes, free_bytes, used_bytes) = lock(&self.registry).totals(Instant::now());
        Ok(FsStats {
            capacity_bytes,
            free_bytes,
            used_bytes,
            inodes,
        })
    }

    pub async fn cluster_status(&self, _req: ClusterStatus) -> Result<ClusterReport> {
        if lock(&self.healer).stale {
            self.heal_now().await?;
        }
        let (files, directories, symlinks, pending_deletes, orphaned_files) = self
            .read(|r| {
                Ok((
                    get_counter(&r.meta, keys::FILES)?,
                    get_counter(&r.meta, keys::DIRECTORIES)?,
                    get_counter(&r.meta, keys::SYMLINKS)?,
                    r.deletes.len()?,
                    r.orphans.len()?,
                ))
            })
            .await?;
        let now = Instant::now();
        let mut nodes = lock(&self.registry).report(now);
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.node.id).collect();
        let deletes_per_node = self
            .read(move |r| {
                ids.into_iter()
                    .map(|id| Ok(r.deletes.range((id, 0)..=(id, u64::MAX))?.count() as u64))
                    .collect::<Result<Vec<u64>>>()
            })
            .await?;
        let unverified = {
            let registry = lock(&self.registry);
            let checks = lock(&self.presence_checks);
            nodes
                .iter()
                .filter(|n| {
                    n.state == NodeState::Up && (!registry.inventoried(n.node.id) || checks.contains_key(&n.node.id))
                })
                .count() as u64
        };
        let redundancy = {
            let healer = lock(&self.healer);
            for n in nodes.iter_mut() {
                n.incoming_copies = healer.in_flight.keys().filter(|k| k.1 == n.node.id).count() as u64;
            }
            healer.report(now)
        };
        for (n, d) in nodes.iter_mut().zip(deletes_per_node) {
            n.pending_deletes = d;
        }
        let redundancy = Redundancy {
            unverified_daemons: unverified,
            ..redundancy
        };
        Ok(ClusterReport {
            nodes,
            replicas: self.settings.replicas,
            redundancy,
            files,
            directories,
            symlinks,
            chunk_size: self.settings.chunk_size,
            pending_deletes,
            orphaned_files,
            sessions: lock(&self.sessions).len() as u64,
        })
    }

    // ------------------------------------------------------------------------------------------
    // Storage daemons

    pub async fn register_node(&self, req: RegisterNode) -> Result<Registered> {
        if let Err(e) = dfs_proto::certs::validate_name(&req.name) {
            return Err(MetaError::fs(ErrorKind::InvalidArgument, e.to_string()));
        }
        let (name, addr, domain) = (req.name.clone(), req.addr.clone(), req.domain.clone());
        let node = self
            .write(move |ctx| namespace::register_node(ctx, &name, &addr, domain.as_deref()))
            .await?;
        {
            let mut registry = lock(&self.registry);
            registry.registered(node, req.name.clone(), req.addr.clone(), req.usage, Instant::now());
            // What it holds is unconfirmed until its inventory (sent after registering) is in.
            registry.set_inventoried(node, false);
            registry.set_domain(node, req.domain.clone());
        }
        // Orders sent before the daemon restarted are lost with it: plan them again.
        {
            let mut healer = lock(&self.healer);
            healer.in_flight.retain(|k, _| k.1 != node);
            healer.outbox.remove(&node);
        }
        lock(&self.inventories).remove(&node);
        lock(&self.presence_checks).remove(&node);
        tracing::info!(
            "storage daemon {} registered as node {node} at {} ({} pieces, {} bytes, {} bytes free)",
            req.name,
            req.addr,
            req.usage.pieces,
            req.usage.bytes,
            req.usage.free_bytes
        );
        Ok(Registered {
            node,
            heartbeat_ms: (self.settings.heartbeat_timeout.as_millis() / 5).clamp(100, 1000) as u32,
        })
    }

    pub async fn heartbeat(&self, req: Heartbeat) -> Result<HeartbeatReply> {
        let node = req.node;
        if !lock(&self.registry).heartbeat(node, req.usage, Instant::now()) {
            return Err(MetaError::fs(
                ErrorKind::Stale,
                format!("node {node} is not registered"),
            ));
        }
        // Copies first: a copy of a piece whose deletion this daemon confirms in the same
        // heartbeat may be gone, and the deletion's queue entry is what makes the copy refused.
        if !req.copied.is_empty() {
            self.copies_done(node, req.copied).await?;
            let rescan = {
                let healer = lock(&self.healer);
                !healer.outbox.contains_key(&node) && healer.rescan_due(Instant::now())
            };
            if rescan && let Err(e) = self.heal().await {
                tracing::error!("cannot scan for pieces needing copies: {e}");
            }
        }
        if !req.deleted.is_empty() {
            let deleted = req.deleted;
            self.write(move |ctx| namespace::ack_deletes(ctx, node, &deleted))
                .await?;
        }
        if !req.corrupt.is_empty() {
            self.corrupt_reported(node, req.corrupt).await?;
        }
        if !req.missing.is_empty() {
            self.missing_reported(node, req.missing).await?;
        }
        // The daemon checks what it was handed before its next heartbeat, which says so
        // (`checked_round`); a batch not confirmed (its reply was lost) is handed out again.
        let (check, check_round) = {
            let mut checks = lock(&self.presence_checks);
            match checks.get_mut(&node) {
                Some(c) => {
                    if c.handed.as_ref().is_some_and(|(round, _)| *round == req.checked_round) {
                        c.handed = None;
                    }
                    if c.handed.is_none() && !c.queue.is_empty() {
                        let take = c.queue.len().min(CHECKS_PER_HEARTBEAT);
                        let batch: Vec<PieceId> = c.queue.drain(..take).collect();
                        let round = self.check_rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        c.handed = Some((round, batch));
                    }
                    match &c.handed {
                        Some((round, batch)) => (batch.clone(), *round),
                        None => {
                            checks.remove(&node);
                            (Vec::new(), 0)
                        }
                    }
                }
                None => (Vec::new(), 0),
            }
        };
        let (delete, more) = self
            .read(move |r| {
                let mut out = Vec::new();
                let mut more = false;
                for item in r.deletes.range((node, 0)..=(node, u64::MAX))? {
                    if out.len() == DELETES_PER_HEARTBEAT {
                        more = true;
                        break;
                    }
                    out.push(item?.0.value().1);
                }
                Ok((out, more))
            })
            .await?;
        let copy = self.orders_for(node);
        let inventory_wanted = !lock(&self.registry).inventoried(node);
        Ok(HeartbeatReply {
            delete,
            more,
            copy,
            inventory_wanted,
            check,
            check_round,
        })
    }

    pub async fn inventory(&self, req: Inventory) -> Result<InventoryReply> {
        let node = req.node;
        let name = match lock(&self.registry).node(node) {
            Some(n) => n.name.clone(),
            None => {
                return Err(MetaError::fs(
                    ErrorKind::Stale,
                    format!("node {node} is not registered"),
                ));
            }
        };
        let pieces = req.pieces;
        let checked = self
            .read(move |r| {
                pieces
                    .into_iter()
                    .map(|p| {
                        let known = r.node_pieces.get((node, p.piece))?.is_some();
                        let queued = r.deletes.get((node, p.piece))?.is_some();
                        Ok((p, known, queued))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .await?;
        let grace = self.settings.orphan_piece_grace.as_secs();
        let mut unreferenced = Vec::new();
        {
            let registry = lock(&self.registry);
            let mut inventories = lock(&self.inventories);
            let seen = inventories.entry(node).or_default();
            let mut healer = lock(&self.healer);
            for (p, known, queued) in checked {
                seen.insert(p.piece);
                if known {
                    // A copy taken for missing is here after all.
                    healer.missing_only.remove(&p.piece);
                }
                // Unreferenced and old enough that no client can still commit it.
                if !queued && !known && !registry.is_pending(p.piece) {
                    if p.age_secs >= grace {
                        unreferenced.push(p.piece);
                    } else {
                        let due = Instant::now() + Duration::from_secs(grace - p.age_secs);
                        lock(&self.young_unreferenced).insert((node, p.piece), due);
                    }
                }
            }
        }
        if !unreferenced.is_empty() {
            tracing::info!(
                "storage daemon {name} holds {} unreferenced pieces: queueing them for deletion",
                unreferenced.len()
            );
            // Through the deletion queue, like any other: a late commit of one of them is then
            // refused instead of referencing a deleted piece.
            self.write(move |ctx| {
                for piece in unreferenced {
                    ctx.deletes.insert((node, piece), ())?;
                }
                Ok(())
            })
            .await?;
        }
        if req.last {
            let seen = lock(&self.inventories).remove(&node).unwrap_or_default();
            let missing = self
                .read(move |r| {
                    let mut missing = Vec::new();
                    for item in r.node_pieces.range((node, 0)..=(node, u64::MAX))? {
                        let (key, value) = item?;
                        let piece = key.value().1;
                        if !seen.contains(&piece) {
                            missing.push((piece, value.value().0));
                        }
                    }
                    Ok(missing)
                })
                .await?;
            if let Some((piece, ino)) = missing.first() {
                tracing::warn!(
                    "storage daemon {name} (node {node}) did not list {} pieces it should hold, e.g. piece {piece} of \
                     inode {ino}: asking it to check them",
                    missing.len()
                );
            }
            if !missing.is_empty() {
                lock(&self.presence_checks).insert(
                    node,
                    PresenceCheck {
                        queue: missing.into_iter().map(|(piece, _)| piece).collect(),
                        handed: None,
                    },
                );
            }
            // Only now: what it lacks is queued for checking, so it is not counted verified.
            lock(&self.registry).set_inventoried(node, true);
        }
        Ok(InventoryReply {})
    }

    // ------------------------------------------------------------------------------------------
    // Housekeeping

    /// Expires sessions, logs daemons going up or down and reaps orphaned files no longer open.
    pub async fn housekeeping(&self) {
        let now = Instant::now();
        let expired = lock(&self.sessions).expire(now);
        if !expired.is_empty() {
            for (id, client) in &expired {
                let held_locks = self.locks.release_session(*id);
                tracing::warn!(
                    "session {id} of {client} expired: its open files{} are released",
                    if held_locks { " and locks" } else { "" }
                );
            }
            let ids: Vec<u64> = expired.iter().map(|(id, _)| *id).collect();
            if let Err(e) = self
                .write(move |ctx| {
                    for id in ids {
                        ctx.sessions.remove(id)?;
                    }
                    Ok(())
                })
                .await
            {
                tracing::error!("cannot forget expired sessions: {e}");
            }
        }
        {
            let mut registry = lock(&self.registry);
            registry.expire_pending(now, PENDING_MAX_AGE);
            for (node, up, silent) in registry.transitions(now) {
                if up {
                    tracing::info!("storage daemon {node} is up");
                } else {
                    match silent {
                        Some(d) => tracing::warn!(
                            "storage daemon {node} is down: no heartbeat for {:.1}s",
                            d.as_secs_f64()
                        ),
                        None => tracing::warn!("storage daemon {node} has not reported since the metaserver started"),
                    }
                }
            }
        }
        self.expire_snapshots(now);
        self.sweep_commit_answers(now).await;
        let due = lock(&self.healer).scan_due(now);
        if due && let Err(e) = self.heal().await {
            tracing::error!("cannot scan for pieces needing copies: {e}");
        }
        // After a restart, mounts that had sessions re-declare their open files first.
        if !lock(&self.sessions).settled(now) {
            return;
        }
        let orphans = self
            .read(|r| {
                let mut out = Vec::new();
                for item in r.orphans.iter()?.take(1000) {
                    out.push(item?.0.value());
                }
                Ok(out)
            })
            .await;
        let orphans = match orphans {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("cannot list orphaned files: {e}");
                return;
            }
        };
        let closed: Vec<Ino> = {
            let sessions = lock(&self.sessions);
            orphans.into_iter().filter(|ino| !sessions.is_open(*ino)).collect()
        };
        if closed.is_empty() {
            return;
        }
        let n = closed.len();
        let result = self
            .write(move |ctx| {
                for ino in closed {
                    namespace::reap_orphan(ctx, ino)?;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => tracing::debug!("reaped {n} unlinked files"),
            Err(e) => tracing::error!("cannot reap unlinked files: {e}"),
        }
    }

    /// Hourly (and at start): forgets commit answers of mounts that went away unsettled.
    async fn sweep_commit_answers(&self, now: Instant) {
        {
            let mut swept = lock(&self.commits_swept);
            if swept.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(3600)) {
                return;
            }
            *swept = Some(now);
        }
        match self.write(namespace::forget_old_commits).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!("forgot {n} commit answers kept for retries"),
            Err(e) => tracing::error!("cannot sweep commit answers: {e}"),
        }
    }

    pub fn reaper_signal(&self) -> Arc<Notify> {
        self.reaper.clone()
    }
}
