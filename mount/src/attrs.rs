//! Attributes this mount learned from recent replies. The kernel invalidates a directory's
//! cached attributes whenever an entry is added or removed, then asks again at the next
//! permission check; the metaserver's reply to the change already said what they became, so
//! the mount answers from here (for no longer than the kernel itself may cache attributes).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dfs_proto::meta::Changes;
use dfs_proto::types::{Attr, Ino};

/// Past this many entries, expired ones are dropped (and if that is not enough, all).
const MAX_ENTRIES: usize = 100_000;

pub struct AttrCache {
    ttl: Duration,
    entries: Mutex<HashMap<Ino, (Attr, Instant)>>,
}

impl AttrCache {
    pub fn new(ttl: Duration) -> Self {
        AttrCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn put(&self, attr: &Attr) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("attr cache");
        if entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(attr.ino, (*attr, now));
    }

    /// Records what an operation changed.
    pub fn apply(&self, changes: &Changes) {
        for a in &changes.changed {
            self.put(a);
        }
        if !changes.removed.is_empty() {
            let mut entries = self.entries.lock().expect("attr cache");
            for ino in &changes.removed {
                entries.remove(ino);
            }
        }
    }

    /// Drops what is known of `ino` (it may have changed elsewhere).
    pub fn forget(&self, ino: Ino) {
        self.entries.lock().expect("attr cache").remove(&ino);
    }

    /// The attributes of `ino` if learned within the TTL.
    pub fn get(&self, ino: Ino) -> Option<Attr> {
        let entries = self.entries.lock().expect("attr cache");
        entries
            .get(&ino)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(a, _)| *a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfs_proto::types::{FileKind, Timestamp};

    fn attr(ino: Ino, size: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::RegularFile,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size,
            nlink: 1,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            rdev: 0,
            stored_bytes: 0,
            has_xattrs: false,
            dir_version: 0,
        }
    }

    #[test]
    fn entries_expire_and_changes_apply() {
        let c = AttrCache::new(Duration::from_millis(50));
        c.put(&attr(1, 10));
        assert_eq!(c.get(1).unwrap().size, 10);
        c.apply(&Changes {
            changed: vec![attr(1, 20), attr(2, 5)],
            removed: vec![],
        });
        assert_eq!(c.get(1).unwrap().size, 20);
        c.apply(&Changes {
            changed: vec![],
            removed: vec![2],
        });
        assert!(c.get(2).is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get(1).is_none());
        assert!(AttrCache::new(Duration::ZERO).get(1).is_none());
    }
}
