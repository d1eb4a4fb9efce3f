//! Mount sessions and the files they hold open.
//!
//! A file whose last link is removed while open stays (as an orphan) until no session has it
//! open. Open files are kept in memory; the ids of live sessions are also stored, so that after
//! a metaserver restart it knows which mounts must resume (re-declaring their open files) before
//! anything unlinked may be deleted. Until they all have, or the session timeout has passed, the
//! sessions are *unsettled*.
//!
//! Deciding to delete an inode and registering an open of it are serialised here: a transaction
//! that decides to delete an unopened inode marks it *doomed* ([`Sessions::doom_if_closed`])
//! until that transaction is durable (or failed), and an open of a doomed inode waits for that
//! outcome ([`Sessions::is_doomed`]) instead of reading the snapshot from before the deletion.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dfs_proto::types::{HandleId, Ino, SessionId};

#[derive(Debug)]
struct Session {
    client: String,
    last_seen: Instant,
    /// Each open handle of the mount and the inode it is open on. Keyed by handle, so that a
    /// repeated open or release (a retried request) counts once.
    opens: HashMap<HandleId, Ino>,
    /// How many of `opens` are on each inode.
    open_inos: HashMap<Ino, u32>,
}

#[derive(Debug)]
pub struct Sessions {
    next_id: SessionId,
    sessions: HashMap<SessionId, Session>,
    open_counts: HashMap<Ino, u32>,
    timeout: Duration,
    /// Sessions alive before the metaserver started that have not resumed yet.
    awaiting: HashSet<SessionId>,
    started: Instant,
    /// Inodes the transaction being committed deletes (no open may register meanwhile).
    doomed: HashSet<Ino>,
}

/// What opening a session changed, for the persistent list of live sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub session: SessionId,
    /// A stored session this one replaces.
    pub replaces: Option<SessionId>,
}

impl Sessions {
    /// `awaiting`: sessions stored by the previous run of the metaserver.
    pub fn new(timeout: Duration, awaiting: HashSet<SessionId>, now: Instant) -> Self {
        // Ids from a previous run of the metaserver must not collide with new ones.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Sessions {
            next_id: seed << 8,
            sessions: HashMap::new(),
            open_counts: HashMap::new(),
            timeout,
            awaiting,
            started: now,
            doomed: HashSet::new(),
        }
    }

    /// Decides whether an inode that lost its last link may be deleted now: only once the
    /// sessions are settled and nothing has it open. If so, it is doomed until
    /// [`Sessions::clear_doomed`] (the deciding transaction is durable or failed).
    pub fn doom_if_closed(&mut self, ino: Ino, now: Instant) -> bool {
        if !self.settled(now) || self.is_open(ino) {
            return false;
        }
        self.doomed.insert(ino);
        true
    }

    /// Whether a transaction in progress deletes `ino`.
    pub fn is_doomed(&self, ino: Ino) -> bool {
        self.doomed.contains(&ino)
    }

    /// The transaction that doomed inodes is over (committed or failed).
    pub fn clear_doomed(&mut self) {
        self.doomed.clear();
    }

    /// Whether every mount that had files open before a restart has come back (or had its
    /// chance): only then may files without links be deleted.
    pub fn settled(&self, now: Instant) -> bool {
        self.awaiting.is_empty() || now.saturating_duration_since(self.started) >= self.timeout
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Starts (or resumes) a session holding `open_files` (handle, inode).
    pub fn open_session(
        &mut self,
        client: String,
        resume: Option<SessionId>,
        open_files: &[(HandleId, Ino)],
        now: Instant,
    ) -> Opened {
        let (id, replaces) = match resume {
            Some(id) if self.sessions.contains_key(&id) => {
                self.drop_session(id);
                (id, None)
            }
            other => {
                self.next_id += 1;
                // A mount from before a restart is back.
                let replaces = other.filter(|old| self.awaiting.remove(old));
                (self.next_id, replaces.or(other))
            }
        };
        self.sessions.insert(
            id,
            Session {
                client,
                last_seen: now,
                opens: HashMap::new(),
                open_inos: HashMap::new(),
            },
        );
        for &(handle, ino) in open_files {
            self.open(id, handle, ino, now);
        }
        Opened { session: id, replaces }
    }

    /// Ends a session at the mount's request.
    pub fn close_session(&mut self, id: SessionId) -> bool {
        self.drop_session(id).is_some()
    }

    fn drop_session(&mut self, id: SessionId) -> Option<Session> {
        let session = self.sessions.remove(&id)?;
        for ino in session.opens.values() {
            self.forget_open(*ino);
        }
        Some(session)
    }

    /// One open fewer of `ino`; true if it was the last anywhere.
    fn forget_open(&mut self, ino: Ino) -> bool {
        match self.open_counts.get_mut(&ino) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                self.open_counts.remove(&ino);
                true
            }
            None => true,
        }
    }

    pub fn renew(&mut self, id: SessionId, now: Instant) -> bool {
        match self.sessions.get_mut(&id) {
            Some(s) => {
                s.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// Registers an open (once per handle); false if the session is unknown.
    pub fn open(&mut self, id: SessionId, handle: HandleId, ino: Ino, now: Instant) -> bool {
        let Some(s) = self.sessions.get_mut(&id) else {
            return false;
        };
        s.last_seen = now;
        if s.opens.insert(handle, ino).is_none() {
            let mine = s.open_inos.entry(ino).or_default();
            *mine = mine.saturating_add(1);
            let count = self.open_counts.entry(ino).or_default();
            *count = count.saturating_add(1);
        }
        true
    }

    /// Whether a session other than `id` has `ino` open.
    pub fn open_elsewhere(&self, id: SessionId, ino: Ino) -> bool {
        let all = self.open_counts.get(&ino).copied().unwrap_or(0);
        let mine = (self.sessions.get(&id))
            .and_then(|s| s.open_inos.get(&ino).copied())
            .unwrap_or(0);
        all > mine
    }

    /// Drops an open handle (a repeated release is ignored); true if that was the last open of
    /// its inode anywhere.
    pub fn release(&mut self, id: SessionId, handle: HandleId, now: Instant) -> bool {
        let Some(s) = self.sessions.get_mut(&id) else {
            return false;
        };
        s.last_seen = now;
        match s.opens.remove(&handle) {
            Some(ino) => {
                if let Some(mine) = s.open_inos.get_mut(&ino) {
                    *mine -= 1;
                    if *mine == 0 {
                        s.open_inos.remove(&ino);
                    }
                }
                self.forget_open(ino)
            }
            None => false,
        }
    }

    pub fn is_open(&self, ino: Ino) -> bool {
        self.open_counts.contains_key(&ino)
    }

    /// Ends sessions not renewed within the timeout; returns (id, client) of each. Sessions
    /// awaited since a restart that did not come back are returned too (with client "?").
    pub fn expire(&mut self, now: Instant) -> Vec<(SessionId, String)> {
        let mut gone: Vec<(SessionId, String)> = Vec::new();
        if now.saturating_duration_since(self.started) >= self.timeout {
            gone.extend(self.awaiting.drain().map(|id| (id, "?".to_owned())));
        }
        let timeout = self.timeout;
        let dead: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) > timeout)
            .map(|(&id, _)| id)
            .collect();
        gone.extend(
            dead.into_iter()
                .filter_map(|id| self.drop_session(id).map(|s| (id, s.client))),
        );
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_are_counted_across_sessions_once_per_handle() {
        let now = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(10), HashSet::new(), now);
        let a = s.open_session("a".into(), None, &[], now).session;
        let b = s.open_session("b".into(), None, &[], now).session;
        assert!(s.open(a, 1, 7, now));
        assert!(s.open(a, 1, 7, now), "a retried open");
        assert!(s.open(b, 1, 7, now));
        assert!(!s.release(a, 1, now));
        assert!(!s.release(a, 1, now), "a retried release");
        assert!(s.is_open(7));
        assert!(s.release(b, 1, now));
        assert!(!s.is_open(7));
        assert!(!s.open(12345, 1, 7, now));
    }

    #[test]
    fn an_inode_is_open_elsewhere_only_while_another_session_holds_it() {
        let now = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(10), HashSet::new(), now);
        let a = s.open_session("a".into(), None, &[], now).session;
        let b = s.open_session("b".into(), None, &[], now).session;
        s.open(a, 1, 7, now);
        s.open(a, 2, 7, now);
        assert!(!s.open_elsewhere(a, 7), "two handles of one mount");
        assert!(s.open_elsewhere(b, 7));
        s.open(b, 1, 7, now);
        assert!(s.open_elsewhere(a, 7) && s.open_elsewhere(b, 7));
        s.release(b, 1, now);
        s.release(b, 1, now);
        assert!(!s.open_elsewhere(a, 7), "a repeated release counts once");
        s.release(a, 1, now);
        assert!(s.open_elsewhere(b, 7));
        s.close_session(a);
        assert!(!s.open_elsewhere(b, 7), "a session's opens go with it");
        assert!(!s.open_elsewhere(12345, 8));
    }

    #[test]
    fn an_open_inode_is_never_doomed_and_a_doomed_one_is_visible_until_cleared() {
        let now = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(10), HashSet::new(), now);
        let a = s.open_session("a".into(), None, &[], now).session;
        s.open(a, 1, 7, now);
        assert!(!s.doom_if_closed(7, now), "open somewhere: kept as an orphan");
        assert!(s.doom_if_closed(8, now));
        assert!(s.is_doomed(8) && !s.is_doomed(7));
        s.clear_doomed();
        assert!(!s.is_doomed(8));
        let mut unsettled = Sessions::new(Duration::from_secs(10), HashSet::from([3]), now);
        assert!(!unsettled.doom_if_closed(8, now), "mounts may still re-declare it open");
    }

    #[test]
    fn expiry_releases_opens_and_resume_restores_them() {
        let now = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(10), HashSet::new(), now);
        let a = s.open_session("a".into(), None, &[], now).session;
        s.open(a, 1, 1, now);
        let later = now + Duration::from_secs(11);
        assert_eq!(s.expire(later).len(), 1);
        assert!(!s.is_open(1));
        let a2 = s.open_session("a".into(), Some(a), &[(1, 1), (2, 1)], later).session;
        assert_ne!(a, a2, "an expired session is not resumed");
        assert!(s.is_open(1));
        let a3 = s.open_session("a".into(), Some(a2), &[(1, 1)], later).session;
        assert_eq!(a2, a3);
        assert!(s.release(a3, 1, later));
        assert!(!s.is_open(1));
    }

    #[test]
    fn unsettled_until_every_stored_session_resumes() {
        let now = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(10), HashSet::from([7, 8]), now);
        assert!(!s.settled(now));
        let o = s.open_session("a".into(), Some(7), &[(1, 42)], now);
        assert_eq!(o.replaces, Some(7));
        assert!(s.is_open(42));
        assert!(!s.settled(now));
        s.open_session("b".into(), Some(8), &[], now);
        assert!(s.settled(now));
        let mut t = Sessions::new(Duration::from_secs(10), HashSet::from([9]), now);
        assert!(
            t.settled(now + Duration::from_secs(11)),
            "a mount that never returns stops blocking"
        );
        assert_eq!(t.expire(now + Duration::from_secs(11)), vec![(9, "?".to_owned())]);
        assert!(Sessions::new(Duration::from_secs(10), HashSet::new(), now).settled(now));
    }
}
