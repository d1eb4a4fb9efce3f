//! The mount's connection to the metaserver: requests with deadlines, and a session that
//! survives metaserver restarts (re-declaring the files this mount holds open).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use dfs_proto::meta::{CloseSession, KeepAlive, OpenSession, Release, SessionInfo};
use dfs_proto::types::{HandleId, Ino, SessionId};
use dfs_proto::{Call, ErrorKind, Peer, RpcError};

pub struct MetaClient {
    peer: Peer,
    timeout: Duration,
    client_name: String,
    session: tokio::sync::Mutex<Option<SessionId>>,
    /// Open handles and their inodes, re-declared when a session is re-established.
    open_files: Mutex<HashMap<HandleId, Ino>>,
    /// Releases the metaserver has not acknowledged yet (retried by the keep-alive loop).
    unsent_releases: Mutex<Vec<(HandleId, Ino)>>,
}

impl MetaClient {
    pub fn new(peer: Peer, timeout: Duration, client_name: String) -> Self {
        MetaClient {
            peer,
            timeout,
            client_name,
            session: tokio::sync::Mutex::new(None),
            open_files: Mutex::new(HashMap::new()),
            unsent_releases: Mutex::new(Vec::new()),
        }
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
        let info = self
            .call(OpenSession {
                client: self.client_name.clone(),
                resume: *slot,
                open_files,
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
        Ok(info)
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
                self.call(make(fresh)).await
            }
            other => other,
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

    pub fn note_open(&self, handle: HandleId, ino: Ino) {
        self.open_files.lock().expect("open files").insert(handle, ino);
    }

    /// Forgets an open handle and tells the metaserver (retrying later if it cannot be told;
    /// a release that arrives twice counts once).
    pub async fn release(&self, handle: HandleId, ino: Ino) {
        self.open_files.lock().expect("open files").remove(&handle);
        if let Err(e) = self.call_in_session(|session| Release { ino, session, handle }).await {
            tracing::warn!("cannot tell metaserver about closing inode {ino} (will retry): {e}");
            self.unsent_releases.lock().expect("releases").push((handle, ino));
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
            let pending: Vec<(HandleId, Ino)> = std::mem::take(&mut *self.unsent_releases.lock().expect("releases"));
            for (handle, ino) in pending {
                if let Err(e) = self.call_in_session(|session| Release { ino, session, handle }).await {
                    tracing::debug!("release of inode {ino} still not delivered: {e}");
                    self.unsent_releases.lock().expect("releases").push((handle, ino));
                }
            }
        }
    }
}
