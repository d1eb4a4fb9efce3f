//! The mount's connection to the metaserver: requests with deadlines, and a session that
//! survives metaserver restarts (re-declaring the files this mount holds open).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dfs_proto::locks::{LockKind, LockOwner, LockTable};
use dfs_proto::meta::{
    CloseSession, CommitId, CommitWrite, Fence, KeepAlive, MAX_RELEASE_BATCH, OpenSession, ReleaseHandles, SessionInfo,
};
use dfs_proto::types::Attr;
use dfs_proto::types::{HandleId, Ino, SessionId};
use dfs_proto::{Call, ErrorKind, Peer, RpcError};

pub struct MetaClient {
    peer: Peer,
    timeout: Duration,
    client_name: String,
    session: tokio::sync::Mutex<Option<SessionId>>,
    /// Moves every time a session is (re-)established: what the mount learned in an earlier
    /// one may predate a metaserver restart.
    session_epoch: AtomicU64,
    /// Open handles and their inodes, re-declared when a session is re-established.
    open_files: Mutex<HashMap<HandleId, Ino>>,
    /// Releases not sent yet, or not acknowledged (sent in batches by `send_releases`; retried
    /// by the keep-alive loop).
    unsent_releases: Mutex<Vec<(HandleId, Ino)>>,
    releases_queued: tokio::sync::Notify,
    /// Held while a batch of releases is on its way, so that waiting for the queue to drain
    /// (`flush_releases`) includes the batch in flight.
    sending_releases: tokio::sync::Mutex<()>,
    /// Locks this mount holds, by inode (owners are kernel lock owners; the session part is
    /// unused), claimed again when a session is re-established.
    held_locks: Mutex<HashMap<Ino, LockTable>>,
    /// The metaserver's hold of this mount's locks on each inode: writes made under it are
    /// committed only while it lasts.
    holds: Mutex<HashMap<Ino, Fence>>,
    /// Holds this mount ended itself (its last lock on the file released): writes picked up
    /// under one just before are committed without a fence, not refused. Holds lost with a
    /// session are not here: writes made under those are refused.
    released_holds: Mutex<std::collections::VecDeque<u64>>,
    /// Names commits (with `next_commit`) so that a retry is recognised.
    commit_client: u64,
    next_commit: AtomicU64,
    /// Commits not answered yet (the lowest tells the metaserver which answers it may forget).
    unsettled: Mutex<BTreeSet<u64>>,
}

/// Attempts at one commit when the metaserver cannot be reached (a restart takes a second or
/// two): each is bounded by the request timeout.
const COMMIT_ATTEMPTS: u32 = 3;

/// A close's release waits this long for a create or an open to carry it (the metaserver
/// deletes an unlinked file only once it is released; an unlink sends the queue first).
const RELEASE_DELAY: Duration = Duration::from_millis(20);

/// Session part of the owners in `held_locks`: the metaserver's session id is not part of
/// what this mount remembers.
const LOCAL: u64 = 0;

impl MetaClient {
    pub fn new(peer: Peer, timeout: Duration, client_name: String) -> Self {
        MetaClient {
            peer,
            timeout,
            client_name,
            session: tokio::sync::Mutex::new(None),
            session_epoch: AtomicU64::new(0),
            open_files: Mutex::new(HashMap::new()),
            unsent_releases: Mutex::new(Vec::new()),
            releases_queued: tokio::sync::Notify::new(),
            sending_releases: tokio::sync::Mutex::new(()),
            held_locks: Mutex::new(HashMap::new()),
            holds: Mutex::new(HashMap::new()),
            released_holds: Mutex::new(std::collections::VecDeque::new()),
            commit_client: commit_client_id(),
            next_commit: AtomicU64::new(1),
            unsettled: Mutex::new(BTreeSet::new()),
        }
    }

    /// Commits written pieces. The commit is named, so it is retried (same name) when the
    /// metaserver cannot be reached, and a retry of one that was applied gets its answer.
    pub async fn commit(&self, mut request: CommitWrite) -> Result<Attr, RpcError> {
        let seq = self.next_commit.fetch_add(1, Ordering::Relaxed);
        let settled_below = {
            let mut unsettled = self.unsettled.lock().expect("unsettled");
            unsettled.insert(seq);
            *unsettled.first().expect("just inserted")
        };
        request.id = CommitId {
            client: self.commit_client,
            seq,
            settled_below,
        };
        let mut attempt = 1;
        let result = loop {
            match self.call(request.clone()).await {
                Err(e) if e.is_unavailable() && attempt < COMMIT_ATTEMPTS => {
                    tracing::info!("commit of inode {} not answered ({e}); asking again", request.ino);
                    tokio::time::sleep(Duration::from_millis(300 * attempt as u64)).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        self.unsettled.lock().expect("unsettled").remove(&seq);
        result
    }

    /// The hold under which writes to `ino` are made now, if this mount holds a lock on it.
    pub fn fence(&self, ino: Ino) -> Option<Fence> {
        self.holds.lock().expect("holds").get(&ino).copied()
    }

    /// The fence to commit writes made under `fence` with: none if this mount released that
    /// hold itself since (the writes then land as unlocked writes would).
    pub fn fence_for_commit(&self, fence: Option<Fence>) -> Option<Fence> {
        let f = fence?;
        let released = self.released_holds.lock().expect("released holds");
        (!released.contains(&f.hold)).then_some(f)
    }

    /// Records the hold the metaserver answered a granted lock with (in `session`: a grant
    /// answered in a session since replaced is not recorded, its hold is gone).
    pub async fn note_hold(&self, ino: Ino, fence: Fence) {
        if *self.session.lock().await != Some(fence.session) {
            return;
        }
        self.holds.lock().expect("holds").insert(ino, fence);
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub async fn call<C: Call>(&self, request: C) -> Result<C::Reply, RpcError> {
        self.peer.call(request, self.timeout).await
    }

    /// Opens a session (or resumes the current one after a metaserver restart).
    pub async fn open_session(&self) -> Result<SessionInfo, RpcError> {
        let mut session = self.session.lock().await;
        self.establish(&mut session).await
    }

    async fn establish(&self, slot: &mut Option<SessionId>) -> Result<SessionInfo, RpcError> {
        let open_files: Vec<(HandleId, Ino)> = self
            .open_files
            .lock()
            .expect("open files")
            .iter()
            .map(|(&h, &i)| (h, i))
            .collect();
        let locks = self
            .held_locks
            .lock()
            .expect("locks")
            .iter()
            .flat_map(|(&ino, table)| {
                table
                    .iter()
                    .map(move |(owner, pid, range)| (ino, owner.owner, pid, range))
            })
            .collect();
        let info = self
            .call(OpenSession {
                client: self.client_name.clone(),
                resume: *slot,
                open_files,
                locks,
            })
            .await?;
        if slot.is_some_and(|old| old != info.session) {
            tracing::info!(
                "metaserver {} started session {} for this mount",
                self.peer,
                info.session
            );
        }
        *slot = Some(info.session);
        self.session_epoch.fetch_add(1, Ordering::AcqRel);
        // Locks claimed again come with new holds: writes made under the old ones (before the
        // metaserver restarted, or the session expired) are not committed.
        let mut holds = self.holds.lock().expect("holds");
        holds.clear();
        for &(ino, hold) in &info.holds {
            holds.insert(
                ino,
                Fence {
                    session: info.session,
                    hold,
                },
            );
        }
        drop(holds);
        Ok(info)
    }

    /// Counts the sessions established so far.
    pub fn session_epoch(&self) -> u64 {
        self.session_epoch.load(Ordering::Acquire)
    }

    /// This mount's session id (opening one if needed).
    pub async fn session_id(&self) -> Result<SessionId, RpcError> {
        self.current_session().await
    }

    async fn current_session(&self) -> Result<SessionId, RpcError> {
        let mut slot = self.session.lock().await;
        match *slot {
            Some(id) => Ok(id),
            None => Ok(self.establish(&mut slot).await?.session),
        }
    }

    /// Calls a request that names this mount's session, re-establishing the session once if the
    /// metaserver no longer knows it.
    pub async fn call_in_session<C: Call>(&self, make: impl Fn(SessionId) -> C) -> Result<C::Reply, RpcError> {
        Ok(self.call_in_session_named(make).await?.0)
    }

    /// [`MetaClient::call_in_session`], also returning the session the answer came in.
    pub async fn call_in_session_named<C: Call>(
        &self,
        make: impl Fn(SessionId) -> C,
    ) -> Result<(C::Reply, SessionId), RpcError> {
        let id = self.current_session().await?;
        match self.call(make(id)).await {
            Err(e) if e.remote_kind() == Some(ErrorKind::Stale) => {
                let fresh = {
                    let mut slot = self.session.lock().await;
                    if *slot == Some(id) {
                        self.establish(&mut slot).await?.session
                    } else {
                        slot.expect("session set")
                    }
                };
                Ok((self.call(make(fresh)).await?, fresh))
            }
            other => Ok((other?, id)),
        }
    }

    /// Ends the session (at unmount): the metaserver need not wait for this mount after a restart.
    pub async fn close_session(&self) {
        let id = *self.session.lock().await;
        if let Some(session) = id
            && let Err(e) = self.call(CloseSession { session }).await
        {
            tracing::warn!("cannot close session {session} with metaserver: {e}");
        }
    }

    /// Records a lock the metaserver granted (or an unlock it applied).
    pub fn note_lock(&self, ino: Ino, owner: u64, pid: u32, start: u64, end: u64, kind: LockKind) {
        let mut held = self.held_locks.lock().expect("locks");
        let table = held.entry(ino).or_default();
        table.apply(LockOwner { session: LOCAL, owner }, pid, start, end, kind);
        if table.is_empty() {
            held.remove(&ino);
            if let Some(f) = self.holds.lock().expect("holds").remove(&ino) {
                let mut released = self.released_holds.lock().expect("released holds");
                released.push_back(f.hold);
                if released.len() > 4096 {
                    released.pop_front();
                }
            }
        }
    }

    /// Whether `owner` (any owner, if None) holds a lock on `ino` through this mount.
    pub fn holds_lock(&self, ino: Ino, owner: Option<u64>) -> bool {
        let held = self.held_locks.lock().expect("locks");
        held.get(&ino)
            .is_some_and(|t| t.iter().any(|(o, _, _)| owner.is_none_or(|owner| o.owner == owner)))
    }

    /// The owners holding locks on `ino` through this mount.
    pub fn lock_owners(&self, ino: Ino) -> Vec<u64> {
        let held = self.held_locks.lock().expect("locks");
        let mut owners: Vec<u64> = held
            .get(&ino)
            .map(|t| t.iter().map(|(o, _, _)| o.owner).collect())
            .unwrap_or_default();
        owners.dedup();
        owners
    }

    pub fn note_open(&self, handle: HandleId, ino: Ino) {
        self.open_files.lock().expect("open files").insert(handle, ino);
    }

    /// Forgets an open handle; the metaserver is told soon, with others closed meanwhile
    /// (a close waits for nothing but its commit; a release that arrives twice counts once).
    pub fn release(&self, handle: HandleId, ino: Ino) {
        self.open_files.lock().expect("open files").remove(&handle);
        self.unsent_releases.lock().expect("releases").push((handle, ino));
        self.releases_queued.notify_one();
    }

    /// Sends queued releases for the life of the mount: whatever gathered while the previous
    /// batch was on its way goes in the next one.
    pub async fn send_releases(&self) {
        loop {
            self.releases_queued.notified().await;
            // A busy mount sends them with its next create or open; an idle one, shortly.
            tokio::time::sleep(RELEASE_DELAY).await;
            if self.releases_pending() {
                self.flush_releases().await;
            }
        }
    }

    /// [`MetaClient::call_in_session`] for a request that also carries the releases queued
    /// so far (a create or an open): they need no request of their own. If the call fails
    /// they are queued again (a release that arrives twice counts once).
    pub async fn call_releasing<C: Call>(
        &self,
        make: impl Fn(SessionId, Vec<(HandleId, Ino)>) -> C,
    ) -> Result<C::Reply, RpcError> {
        let released: Vec<(HandleId, Ino)> = {
            let mut queue = self.unsent_releases.lock().expect("releases");
            let n = queue.len().min(MAX_RELEASE_BATCH);
            queue.drain(..n).collect()
        };
        let result = self.call_in_session(|session| make(session, released.clone())).await;
        if result.is_err() && !released.is_empty() {
            let mut queue = self.unsent_releases.lock().expect("releases");
            let later = std::mem::replace(&mut *queue, released);
            queue.extend(later);
            self.releases_queued.notify_one();
        }
        result
    }

    /// True if some release has not reached the metaserver yet.
    pub fn releases_pending(&self) -> bool {
        !self.unsent_releases.lock().expect("releases").is_empty()
    }

    /// Sends every queued release (and waits for a batch already on its way). Before an
    /// unlink or rename: a file whose last close is still queued would otherwise be kept as
    /// unlinked-but-open and deleted later, in a transaction of its own. Failures stay queued.
    pub async fn flush_releases(&self) {
        let _sending = self.sending_releases.lock().await;
        loop {
            let batch: Vec<(HandleId, Ino)> = {
                let mut queue = self.unsent_releases.lock().expect("releases");
                let n = queue.len().min(MAX_RELEASE_BATCH);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let request = |session| ReleaseHandles {
                session,
                handles: batch.clone(),
            };
            if let Err(e) = self.call_in_session(request).await {
                tracing::warn!(
                    "cannot tell the metaserver about {} closed files (will retry): {e}",
                    batch.len()
                );
                let mut queue = self.unsent_releases.lock().expect("releases");
                let later = std::mem::replace(&mut *queue, batch);
                queue.extend(later);
                return;
            }
        }
    }

    /// Renews the session for the life of the mount; retries unsent releases.
    pub async fn keep_alive(&self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            let id = match self.current_session().await {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!("metaserver unreachable: {e}");
                    continue;
                }
            };
            match self.call(KeepAlive { session: id }).await {
                Ok(()) => {}
                Err(e) if e.remote_kind() == Some(ErrorKind::Stale) => {
                    let mut slot = self.session.lock().await;
                    if *slot == Some(id)
                        && let Err(e) = self.establish(&mut slot).await
                    {
                        tracing::warn!("cannot re-establish session with metaserver: {e}");
                    }
                }
                Err(e) => tracing::warn!("metaserver unreachable: {e}"),
            }
            if self.releases_pending() {
                self.flush_releases().await;
            }
        }
    }
}

/// An id for this mount's commits, distinct from other mounts' and earlier runs'.
fn commit_client_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 40) ^ hostname_hash()
}

fn hostname_hash() -> u64 {
    let name = std::fs::read("/proc/sys/kernel/hostname").unwrap_or_default();
    name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    })
}
