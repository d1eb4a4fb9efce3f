//! Byte-range lock bookkeeping for one file, POSIX style: an owner's locks never conflict with
//! each other, a new lock replaces (splitting if needed) the owner's locks it overlaps, and
//! read locks of different owners share. The metaserver keeps one table per locked inode for
//! the whole cluster; a mount keeps the same kind of table of the locks it holds, to claim
//! them again from a restarted metaserver.
//!
//! flock() arrives from the kernel as a whole-file lock of its own owner (the open file), so
//! the same rules serve both.

use serde::{Deserialize, Serialize};

use crate::types::SessionId;

/// Whose lock it is: a mount session and the kernel's lock owner within that mount (a process'
/// file table for fcntl locks, an open file for flock).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockOwner {
    pub session: SessionId,
    pub owner: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// One held range; `end` is inclusive (`u64::MAX`: to the end of the file, however long).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRange {
    pub start: u64,
    pub end: u64,
    /// `Read` or `Write`.
    pub kind: LockKind,
}

impl LockRange {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// A lock that stands in the way, as F_GETLK reports it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    pub range: LockRange,
    /// The holder's process id on its own machine (meaningful only there).
    pub pid: u32,
    pub session: SessionId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    owner: LockOwner,
    pid: u32,
    range: LockRange,
}

/// The locks held on one file.
#[derive(Debug, Default, Clone)]
pub struct LockTable {
    held: Vec<Held>,
}

impl LockTable {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The first lock of another owner that a `kind` lock over `start..=end` would conflict with.
    pub fn conflict(&self, owner: LockOwner, start: u64, end: u64, kind: LockKind) -> Option<Conflict> {
        if kind == LockKind::Unlock {
            return None;
        }
        self.held
            .iter()
            .find(|h| {
                h.owner != owner
                    && h.range.overlaps(start, end)
                    && (kind == LockKind::Write || h.range.kind == LockKind::Write)
            })
            .map(|h| Conflict {
                range: h.range,
                pid: h.pid,
                session: h.owner.session,
            })
    }

    /// Sets (or with `Unlock`, clears) `owner`'s lock over `start..=end`, without checking for
    /// conflicts (call [`conflict`](Self::conflict) first).
    pub fn apply(&mut self, owner: LockOwner, pid: u32, start: u64, end: u64, kind: LockKind) {
        let mut kept = Vec::with_capacity(self.held.len() + 2);
        for h in self.held.drain(..) {
            if h.owner != owner || !h.range.overlaps(start, end) {
                kept.push(h);
                continue;
            }
            // The parts of the old range outside the new one survive.
            if h.range.start < start {
                kept.push(Held {
                    range: LockRange {
                        end: start - 1,
                        ..h.range
                    },
                    ..h
                });
            }
            if h.range.end > end {
                kept.push(Held {
                    range: LockRange {
                        start: end + 1,
                        ..h.range
                    },
                    ..h
                });
            }
        }
        self.held = kept;
        if kind == LockKind::Unlock {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Adjacent ranges of the same owner and kind merge into one.
        self.held.retain(|h| {
            let adjacent = h.owner == owner
                && h.range.kind == kind
                && (h.range.end.checked_add(1) == Some(start) || end.checked_add(1) == Some(h.range.start));
            if adjacent {
                start = start.min(h.range.start);
                end = end.max(h.range.end);
            }
            !adjacent
        });
        self.held.push(Held {
            owner,
            pid,
            range: LockRange { start, end, kind },
        });
    }

    /// Drops every lock `owner` holds.
    pub fn release_owner(&mut self, owner: LockOwner) -> bool {
        let before = self.held.len();
        self.held.retain(|h| h.owner != owner);
        self.held.len() != before
    }

    /// Drops every lock held through `session` (the mount closed or died).
    pub fn release_session(&mut self, session: SessionId) -> bool {
        let before = self.held.len();
        self.held.retain(|h| h.owner.session != session);
        self.held.len() != before
    }

    /// Every lock, as (owner, pid, range).
    pub fn iter(&self) -> impl Iterator<Item = (LockOwner, u32, LockRange)> + '_ {
        self.held.iter().map(|h| (h.owner, h.pid, h.range))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockKind::*;

    const A: LockOwner = LockOwner { session: 1, owner: 10 };
    const B: LockOwner = LockOwner { session: 2, owner: 10 };

    fn ranges(t: &LockTable, owner: LockOwner) -> Vec<(u64, u64, LockKind)> {
        let mut v: Vec<_> = t
            .iter()
            .filter(|(o, _, _)| *o == owner)
            .map(|(_, _, r)| (r.start, r.end, r.kind))
            .collect();
        v.sort_by_key(|r| r.0);
        v
    }

    #[test]
    fn readers_share_writers_exclude() {
        let mut t = LockTable::default();
        t.apply(A, 1, 0, 99, Read);
        assert_eq!(t.conflict(B, 50, 60, Read), None);
        let c = t.conflict(B, 50, 60, Write).expect("conflict");
        assert_eq!((c.range.start, c.range.end, c.pid), (0, 99, 1));
        assert_eq!(t.conflict(B, 100, 200, Write), None);
        assert_eq!(
            t.conflict(A, 0, 200, Write),
            None,
            "an owner never conflicts with itself"
        );
    }

    #[test]
    fn unlock_splits_and_upgrade_replaces() {
        let mut t = LockTable::default();
        t.apply(A, 1, 0, u64::MAX, Write);
        t.apply(A, 1, 10, 19, Unlock);
        assert_eq!(ranges(&t, A), vec![(0, 9, Write), (20, u64::MAX, Write)]);
        t.apply(A, 1, 5, 25, Read);
        assert_eq!(ranges(&t, A), vec![(0, 4, Write), (5, 25, Read), (26, u64::MAX, Write)]);
        assert!(t.conflict(B, 12, 12, Read).is_none());
        assert!(t.conflict(B, 12, 12, Write).is_some());
    }

    #[test]
    fn adjacent_ranges_merge() {
        let mut t = LockTable::default();
        t.apply(A, 1, 0, 9, Write);
        t.apply(A, 1, 10, 19, Write);
        t.apply(A, 1, 30, 39, Write);
        t.apply(A, 1, 20, 29, Write);
        assert_eq!(ranges(&t, A), vec![(0, 39, Write)]);
    }

    #[test]
    fn release_by_owner_and_session() {
        let mut t = LockTable::default();
        t.apply(A, 1, 0, 9, Write);
        t.apply(B, 2, 10, 19, Write);
        assert!(t.release_owner(A));
        assert!(!t.release_owner(A));
        assert!(t.release_session(2));
        assert!(t.is_empty());
    }
}
