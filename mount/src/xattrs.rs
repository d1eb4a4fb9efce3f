//! Extended attribute answers this mount got recently. The kernel asks for
//! `security.capability` before every write(2) (to know whether the write must drop file
//! capabilities); answering that from here, for as long as attributes may be cached, keeps a
//! metaserver round trip out of the write path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dfs_proto::types::Ino;

/// Past this many entries the cache starts over.
const MAX_ENTRIES: usize = 50_000;

/// A cached answer: the value, or None for "no such attribute".
type Answer = Option<Vec<u8>>;
/// (inode, attribute name).
type Key = (Ino, Vec<u8>);

pub struct XattrCache {
    ttl: Duration,
    entries: Mutex<HashMap<Key, (Answer, Instant)>>,
}

impl XattrCache {
    pub fn new(ttl: Duration) -> Self {
        XattrCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, ino: Ino, name: &[u8]) -> Option<Answer> {
        let entries = self.entries.lock().expect("xattr cache");
        entries
            .get(&(ino, name.to_vec()))
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(answer, _)| answer.clone())
    }

    pub fn put(&self, ino: Ino, name: &[u8], answer: Answer) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("xattr cache");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert((ino, name.to_vec()), (answer, Instant::now()));
    }

    /// Forgets everything about `ino` (this mount changed its attributes).
    pub fn forget(&self, ino: Ino) {
        self.entries.lock().expect("xattr cache").retain(|(i, _), _| *i != ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_expire_and_are_forgotten() {
        let c = XattrCache::new(Duration::from_millis(40));
        c.put(1, b"security.capability", None);
        c.put(1, b"user.a", Some(b"x".to_vec()));
        assert_eq!(c.get(1, b"security.capability"), Some(None));
        assert_eq!(c.get(1, b"user.a"), Some(Some(b"x".to_vec())));
        c.forget(1);
        assert_eq!(c.get(1, b"user.a"), None);
        c.put(2, b"user.b", None);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.get(2, b"user.b"), None);
    }
}
