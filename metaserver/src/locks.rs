//! Cluster-wide file locks (fcntl byte ranges and flock), held in memory.
//!
//! Locks are leases of a mount session: they go when their owner unlocks, when the mount
//! closes the file (the mount unlocks for it), or when the session ends or expires (the mount
//! died). A restarted metaserver starts empty and mounts claim their locks again when they
//! resume their sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dfs_proto::locks::{Conflict, LockKind, LockOwner, LockRange, LockTable};
use dfs_proto::meta::{LockOutcome, SetLock, TestLock};
use dfs_proto::types::{Ino, SessionId};
use tokio::sync::Notify;

/// Longest a blocking lock request is held here before the mount is told to ask again.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// What claiming locks again gave: the new holds by inode, and the locks lost meanwhile.
pub type Reclaimed = (Vec<(Ino, u64)>, Vec<(Ino, LockRange)>);

pub struct ClusterLocks {
    state: Mutex<State>,
    /// Woken whenever a lock goes away, for waiting requests to look again.
    released: Notify,
}

/// The lock tables and, per (session, inode) holding at least one lock, its hold: an id that
/// stays the same while the session keeps some lock on the inode and is new once it held
/// none. A commit of writes made under a hold is accepted only while that hold lasts.
struct State {
    tables: HashMap<Ino, LockTable>,
    holds: HashMap<(SessionId, Ino), u64>,
    next_hold: u64,
}

impl Default for ClusterLocks {
    fn default() -> Self {
        // Hold ids of a previous run of the metaserver are not reused.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        ClusterLocks {
            state: Mutex::new(State {
                tables: HashMap::new(),
                holds: HashMap::new(),
                next_hold: seed << 8,
            }),
            released: Notify::new(),
        }
    }
}

impl State {
    /// The hold of `session` on `ino`, made now if it had none.
    fn hold(&mut self, session: SessionId, ino: Ino) -> u64 {
        if let Some(&h) = self.holds.get(&(session, ino)) {
            return h;
        }
        self.next_hold += 1;
        self.holds.insert((session, ino), self.next_hold);
        self.next_hold
    }

    /// Ends the holds of sessions that no longer hold any lock on `ino`.
    fn prune_holds(&mut self, ino: Ino) {
        let table = self.tables.get(&ino);
        self.holds.retain(|&(session, i), _| {
            i != ino || table.is_some_and(|t| t.iter().any(|(o, _, _)| o.session == session))
        });
    }
}

impl ClusterLocks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `session` still holds the locks on `ino` it held as `hold`.
    pub fn still_held(&self, session: SessionId, ino: Ino, hold: u64) -> bool {
        self.state().holds.get(&(session, ino)) == Some(&hold)
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
                LockOutcome::Conflict(c) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return LockOutcome::Conflict(c);
                    }
                }
                granted => return granted,
            }
        }
    }

    fn try_set(&self, req: &SetLock) -> LockOutcome {
        let mut state = self.state();
        if req.kind == LockKind::Unlock {
            if let Some(table) = state.tables.get_mut(&req.ino) {
                table.apply(req.owner, req.pid, req.start, req.end, LockKind::Unlock);
                if table.is_empty() {
                    state.tables.remove(&req.ino);
                }
                state.prune_holds(req.ino);
                self.released.notify_waiters();
            }
            return LockOutcome::Granted { hold: 0 };
        }
        let table = state.tables.entry(req.ino).or_default();
        if let Some(c) = table.conflict(req.owner, req.start, req.end, req.kind) {
            if table.is_empty() {
                state.tables.remove(&req.ino);
            }
            return LockOutcome::Conflict(c);
        }
        // A downgrade (write to read) or a partial unlock lets others in.
        table.apply(req.owner, req.pid, req.start, req.end, req.kind);
        self.released.notify_waiters();
        LockOutcome::Granted {
            hold: state.hold(req.owner.session, req.ino),
        }
    }

    pub fn test(&self, req: &TestLock) -> Option<Conflict> {
        self.state()
            .tables
            .get(&req.ino)
            .and_then(|t| t.conflict(req.owner, req.start, req.end, req.kind))
    }

    /// Drops every lock of a session that ended or expired; true if it held any.
    pub fn release_session(&self, session: SessionId) -> bool {
        let mut state = self.state();
        let mut any = false;
        state.tables.retain(|_, t| {
            any |= t.release_session(session);
            !t.is_empty()
        });
        state.holds.retain(|&(s, _), _| s != session);
        if any {
            self.released.notify_waiters();
        }
        any
    }

    /// Locks a resuming mount still holds. Granted unless someone else took a conflicting
    /// lock meanwhile. Returns the holds of the inodes claimed, all new (writes made under the
    /// old ones are not committed: others may have taken and released the locks meanwhile),
    /// and the locks that could not be granted (that mount lost them).
    pub fn reclaim(&self, session: SessionId, locks: &[(Ino, u64, u32, LockRange)]) -> Reclaimed {
        let mut state = self.state();
        let mut lost = Vec::new();
        let mut inodes = Vec::new();
        for &(ino, owner, pid, range) in locks {
            let owner = LockOwner { session, owner };
            let table = state.tables.entry(ino).or_default();
            if table.conflict(owner, range.start, range.end, range.kind).is_some() {
                lost.push((ino, range));
            } else {
                table.apply(owner, pid, range.start, range.end, range.kind);
                if !inodes.contains(&ino) {
                    inodes.push(ino);
                }
            }
        }
        state.tables.retain(|_, t| !t.is_empty());
        let holds = inodes.into_iter().map(|ino| (ino, state.hold(session, ino))).collect();
        (holds, lost)
    }

    /// Number of locked files (for status).
    pub fn locked_files(&self) -> usize {
        self.state().tables.len()
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
        let hold = match locks.set(&req(1, LockKind::Write, 0)).await {
            LockOutcome::Granted { hold } => hold,
            other => panic!("{other:?}"),
        };
        assert!(locks.still_held(1, 5, hold));
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
        assert!(matches!(waiter.await.unwrap(), LockOutcome::Granted { .. }));
        assert!(!locks.still_held(1, 5, hold), "session 1 holds nothing there any more");
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
        let (holds, lost) = locks.reclaim(3, &[(5, 1, 100, range)]);
        assert!(lost.is_empty());
        assert!(locks.still_held(3, 5, holds[0].1));
        assert_eq!(locks.reclaim(4, &[(5, 1, 100, range)]).1, vec![(5, range)]);
    }
}
