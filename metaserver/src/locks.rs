//! Cluster-wide file locks (fcntl byte ranges and flock), held in memory.
//!
//! Locks are leases of a mount session: they go when their owner unlocks, when the mount
//! closes the file (the mount unlocks for it), or when the session ends or expires (the mount
//! died). A restarted metaserver starts empty and mounts claim their locks again when they
//! resume their sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use dfs_proto::locks::{Conflict, LockKind, LockOwner, LockRange, LockTable};
use dfs_proto::meta::{LockOutcome, SetLock, TestLock};
use dfs_proto::types::{Ino, SessionId};
use tokio::sync::Notify;

/// Longest a blocking lock request is held here before the mount is told to ask again.
const MAX_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct ClusterLocks {
    tables: Mutex<HashMap<Ino, LockTable>>,
    /// Woken whenever a lock goes away, for waiting requests to look again.
    released: Notify,
}

impl ClusterLocks {
    fn tables(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, LockTable>> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grants the lock if nothing conflicts; otherwise waits (up to `wait_ms`, bounded) for
    /// conflicting locks to go.
    pub async fn set(&self, req: &SetLock) -> LockOutcome {
        let wait = Duration::from_millis(req.wait_ms as u64).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a release between the look and the wait is seen.
            let released = self.released.notified();
            match self.try_set(req) {
                LockOutcome::Granted => return LockOutcome::Granted,
                LockOutcome::Conflict(c) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return LockOutcome::Conflict(c);
                    }
                }
            }
        }
    }

    fn try_set(&self, req: &SetLock) -> LockOutcome {
        let mut tables = self.tables();
        if req.kind == LockKind::Unlock {
            if let Some(table) = tables.get_mut(&req.ino) {
                table.apply(req.owner, req.pid, req.start, req.end, LockKind::Unlock);
                if table.is_empty() {
                    tables.remove(&req.ino);
                }
                self.released.notify_waiters();
            }
            return LockOutcome::Granted;
        }
        let table = tables.entry(req.ino).or_default();
        if let Some(c) = table.conflict(req.owner, req.start, req.end, req.kind) {
            if table.is_empty() {
                tables.remove(&req.ino);
            }
            return LockOutcome::Conflict(c);
        }
        // A downgrade (write to read) or a partial unlock lets others in.
        table.apply(req.owner, req.pid, req.start, req.end, req.kind);
        self.released.notify_waiters();
        LockOutcome::Granted
    }

    pub fn test(&self, req: &TestLock) -> Option<Conflict> {
        self.tables()
            .get(&req.ino)
            .and_then(|t| t.conflict(req.owner, req.start, req.end, req.kind))
    }

    /// Drops every lock of a session that ended or expired; true if it held any.
    pub fn release_session(&self, session: SessionId) -> bool {
        let mut tables = self.tables();
        let mut any = false;
        tables.retain(|_, t| {
            any |= t.release_session(session);
            !t.is_empty()
        });
        if any {
            self.released.notify_waiters();
        }
        any
    }

    /// Locks a resuming mount still holds. Granted unless someone else took a conflicting
    /// lock meanwhile; the ones that cannot be granted are returned (that mount lost them).
    pub fn reclaim(&self, session: SessionId, locks: &[(Ino, u64, u32, LockRange)]) -> Vec<(Ino, LockRange)> {
        let mut tables = self.tables();
        let mut lost = Vec::new();
        for &(ino, owner, pid, range) in locks {
            let owner = LockOwner { session, owner };
            let table = tables.entry(ino).or_default();
            if table.conflict(owner, range.start, range.end, range.kind).is_some() {
                lost.push((ino, range));
            } else {
                table.apply(owner, pid, range.start, range.end, range.kind);
            }
        }
        tables.retain(|_, t| !t.is_empty());
        lost
    }

    /// Number of locked files (for status).
    pub fn locked_files(&self) -> usize {
        self.tables().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(session: SessionId, kind: LockKind, wait_ms: u32) -> SetLock {
        SetLock {
            ino: 5,
            owner: LockOwner { session, owner: 1 },
            pid: 100,
            start: 0,
            end: u64::MAX,
            kind,
            wait_ms,
        }
    }

    #[tokio::test]
    async fn a_waiting_lock_is_granted_when_the_holder_unlocks() {
        let locks = std::sync::Arc::new(ClusterLocks::default());
        assert_eq!(locks.set(&req(1, LockKind::Write, 0)).await, LockOutcome::Granted);
        assert!(matches!(
            locks.set(&req(2, LockKind::Read, 0)).await,
            LockOutcome::Conflict(_)
        ));
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.set(&req(2, LockKind::Write, 2000)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        locks.set(&req(1, LockKind::Unlock, 0)).await;
        assert_eq!(waiter.await.unwrap(), LockOutcome::Granted);
    }

    #[tokio::test]
    async fn session_end_releases_and_reclaim_restores() {
        let locks = ClusterLocks::default();
        locks.set(&req(1, LockKind::Write, 0)).await;
        assert!(locks.release_session(1));
        assert_eq!(locks.locked_files(), 0);
        let range = LockRange {
            start: 0,
            end: 9,
            kind: LockKind::Write,
        };
        assert!(locks.reclaim(3, &[(5, 1, 100, range)]).is_empty());
        assert_eq!(locks.reclaim(4, &[(5, 1, 100, range)]), vec![(5, range)]);
    }
}
