//! Directories whose every entry this mount knows, so that it answers a lookup of a name
//! that is not there without asking the metaserver (`tar -x`, `cp -r`, `git clone` look up
//! every name before creating it: one round trip per file otherwise).
//!
//! Knowledge starts when this mount creates a directory (it is empty then) and is kept up to
//! date by this mount's own changes in it: every change of a directory's entries moves its
//! version (`Attr::dir_version`) by one, so a reply showing the version one past the one known
//! says nobody else changed the directory since, and the change is applied here; any other
//! version means someone did, and the knowledge is dropped. Another mount's change between two
//! of ours is not seen until our next one, so a negative answer is trusted only for the entry
//! timeout after the knowledge was last confirmed: the same staleness the kernel's own cache
//! of absent names has (README, "Consistency"). Only negative answers come from here; a name
//! that exists is always looked up.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dfs_proto::types::{Attr, Ino};

/// Names remembered over all known directories; past it the oldest knowledge goes.
pub const MAX_KNOWN_NAMES: usize = 200_000;
/// Directories known at once.
pub const MAX_KNOWN_DIRS: usize = 4096;

struct Known {
    version: u64,
    names: HashSet<Vec<u8>>,
    /// When the knowledge was last confirmed: the moment the request confirming it was sent.
    confirmed: Instant,
}

/// A change this mount made to one directory's entries.
pub enum Change<'a> {
    Added(&'a [u8]),
    Removed(&'a [u8]),
    /// A rename within the directory (replacing `to` if it existed).
    Renamed {
        from: &'a [u8],
        to: &'a [u8],
    },
    /// Entries swapped or replaced in place (`RENAME_EXCHANGE`): the names stay.
    Same,
}

pub struct KnownDirs {
    ttl: Duration,
    dirs: HashMap<Ino, Known>,
    names: usize,
    /// The metaserver session the knowledge was gathered in.
    session_epoch: u64,
}

impl KnownDirs {
    /// `ttl`: how long a negative answer may be given after the knowledge was confirmed (the
    /// mount's entry timeout; zero disables all of this).
    pub fn new(ttl: Duration) -> Self {
        KnownDirs {
            ttl,
            dirs: HashMap::new(),
            names: 0,
            session_epoch: 0,
        }
    }

    /// Forgets everything if the mount's session with the metaserver is not the one the
    /// knowledge was gathered in: a restarted metaserver may have lost changes it holds.
    pub fn in_session(&mut self, epoch: u64) {
        if epoch != self.session_epoch {
            self.clear();
            self.session_epoch = epoch;
        }
    }

    /// Whether `name` is known to be absent from `dir` at `now`.
    pub fn absent(&self, dir: Ino, name: &[u8], now: Instant) -> bool {
        self.dirs
            .get(&dir)
            .is_some_and(|k| now.saturating_duration_since(k.confirmed) < self.ttl && !k.names.contains(name))
    }

    /// This mount created directory `attr` (empty) by a request sent at `sent`.
    pub fn created(&mut self, attr: &Attr, sent: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        if self.dirs.len() >= MAX_KNOWN_DIRS {
            self.evict_oldest();
        }
        self.forget(attr.ino);
        self.dirs.insert(
            attr.ino,
            Known {
                version: attr.dir_version,
                names: HashSet::new(),
                confirmed: sent,
            },
        );
    }

    /// This mount changed `dir`'s entries by a request sent at `sent`; `after` is the
    /// directory's attributes the reply carried (None if it carried none).
    pub fn changed(&mut self, dir: Ino, change: Change<'_>, after: Option<&Attr>, sent: Instant) {
        let Some(known) = self.dirs.get_mut(&dir) else { return };
        let Some(after) = after.filter(|a| a.dir_version == known.version + 1) else {
            // Someone else changed it too (or the reply says nothing): start over.
            self.forget(dir);
            return;
        };
        known.version = after.dir_version;
        known.confirmed = known.confirmed.max(sent);
        match change {
            Change::Added(name) => {
                if known.names.insert(name.to_vec()) {
                    self.names += 1;
                }
            }
            Change::Removed(name) => {
                if known.names.remove(name) {
                    self.names -= 1;
                }
            }
            Change::Renamed { from, to } => {
                if known.names.remove(from) {
                    self.names -= 1;
                }
                if known.names.insert(to.to_vec()) {
                    self.names += 1;
                }
            }
            Change::Same => {}
        }
        while self.names > MAX_KNOWN_NAMES {
            self.evict_oldest();
        }
    }

    /// `name` was found in `dir` by the metaserver: if this mount believed it absent, its
    /// knowledge is wrong (changed elsewhere) and goes.
    pub fn found(&mut self, dir: Ino, name: &[u8]) {
        if self.dirs.get(&dir).is_some_and(|k| !k.names.contains(name)) {
            self.forget(dir);
        }
    }

    pub fn forget(&mut self, dir: Ino) {
        if let Some(k) = self.dirs.remove(&dir) {
            self.names -= k.names.len();
        }
    }

    /// Directories a reply says are gone (removed, or replaced by a rename).
    pub fn forget_removed(&mut self, removed: &[Ino]) {
        for &gone in removed {
            self.forget(gone);
        }
    }

    /// Everything (a new session: the metaserver may have restarted and lost changes).
    pub fn clear(&mut self) {
        self.dirs.clear();
        self.names = 0;
    }

    fn evict_oldest(&mut self) {
        if let Some(&oldest) = self.dirs.iter().min_by_key(|(_, k)| k.confirmed).map(|(ino, _)| ino) {
            self.forget(oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfs_proto::types::{FileKind, Timestamp};

    fn dir(ino: Ino, version: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: 4096,
            nlink: 2,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            rdev: 0,
            stored_bytes: 4096,
            has_xattrs: false,
            dir_version: version,
        }
    }

    #[test]
    fn names_are_known_absent_only_while_nobody_else_changed_the_directory() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut k = KnownDirs::new(ms(1000));
        assert!(
            !k.absent(7, b"a", t0),
            "nothing known of a directory this mount did not create"
        );
        k.created(&dir(7, 0), t0);
        assert!(k.absent(7, b"a", t0 + ms(1)));
        // Our create of "a": one change, ours.
        k.changed(7, Change::Added(b"a"), Some(&dir(7, 1)), t0 + ms(500));
        assert!(!k.absent(7, b"a", t0 + ms(501)), "a name this mount created exists");
        assert!(
            k.absent(7, b"b", t0 + ms(1400)),
            "confirmed again by the create at 500 ms"
        );
        assert!(!k.absent(7, b"b", t0 + ms(1500)), "trusted only for the entry timeout");
        k.changed(7, Change::Removed(b"a"), Some(&dir(7, 2)), t0 + ms(1600));
        assert!(k.absent(7, b"a", t0 + ms(1601)));
        // Another mount changed it between two of ours: the version moved by two.
        k.changed(7, Change::Added(b"c"), Some(&dir(7, 4)), t0 + ms(1700));
        assert!(!k.absent(7, b"zzz", t0 + ms(1701)), "knowledge dropped");
        // Dropped knowledge does not come back from later changes.
        k.changed(7, Change::Added(b"d"), Some(&dir(7, 5)), t0 + ms(1800));
        assert!(!k.absent(7, b"zzz", t0 + ms(1801)));
    }

    #[test]
    fn a_name_found_that_was_believed_absent_drops_the_knowledge() {
        let t0 = Instant::now();
        let mut k = KnownDirs::new(Duration::from_secs(1));
        k.created(&dir(3, 10), t0);
        k.changed(3, Change::Added(b"mine"), Some(&dir(3, 11)), t0);
        k.found(3, b"mine");
        assert!(k.absent(3, b"other", t0), "an expected name changes nothing");
        k.found(3, b"other");
        assert!(!k.absent(3, b"else", t0));
    }

    #[test]
    fn zero_timeout_disables_it_and_memory_is_bounded() {
        let t0 = Instant::now();
        let mut off = KnownDirs::new(Duration::ZERO);
        off.created(&dir(1, 0), t0);
        assert!(!off.absent(1, b"x", t0));
        let mut k = KnownDirs::new(Duration::from_secs(60));
        for d in 0..(MAX_KNOWN_DIRS as u64 + 10) {
            k.created(&dir(100 + d, 0), t0 + Duration::from_micros(d));
        }
        assert_eq!(k.dirs.len(), MAX_KNOWN_DIRS);
        assert!(!k.absent(100, b"x", t0), "the oldest went first");
        let big = 100 + MAX_KNOWN_DIRS as u64;
        for i in 0..(MAX_KNOWN_NAMES as u64 + 5) {
            let name = format!("f{i}");
            k.changed(big, Change::Added(name.as_bytes()), Some(&dir(big, i + 1)), t0);
            if !k.dirs.contains_key(&big) {
                break;
            }
        }
        assert!(k.names <= MAX_KNOWN_NAMES);
    }
}
