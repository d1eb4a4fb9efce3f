//! A directory being listed: pages fetched from the metaserver on demand, so a listing of any
//! size needs one page of memory. Positions 0 and 1 are "." and ".."; entry i of the directory
//! is at position i + 2, and each entry's FUSE offset is the position after it.

use dfs_proto::meta::DirEntry;
use dfs_proto::types::Attr;

/// Entries fetched per metaserver request.
pub const PAGE: u32 = 1024;
/// Position of the first real entry.
pub const FIRST_ENTRY: u64 = 2;

pub struct DirHandle {
    pub dir: Attr,
    entries: Vec<DirEntry>,
    /// Position of `entries[0]`.
    base: u64,
    /// Name after which the next page starts.
    pub cursor: Option<Vec<u8>>,
    pub done: bool,
}

impl DirHandle {
    pub fn new(dir: Attr) -> Self {
        DirHandle {
            dir,
            entries: Vec::new(),
            base: FIRST_ENTRY,
            cursor: None,
            done: false,
        }
    }

    /// Starts the listing over (rewinddir, or a seek backwards past what is kept).
    pub fn rewind(&mut self) {
        self.entries.clear();
        self.base = FIRST_ENTRY;
        self.cursor = None;
        self.done = false;
    }

    /// Whether `pos` can be served from this handle without starting over.
    pub fn reachable(&self, pos: u64) -> bool {
        pos < FIRST_ENTRY || pos >= self.base
    }

    /// One past the last fetched position.
    pub fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    pub fn get(&self, pos: u64) -> Option<&DirEntry> {
        pos.checked_sub(self.base).and_then(|i| self.entries.get(i as usize))
    }

    /// Forgets entries before `pos` (already returned) to bound memory.
    pub fn discard_before(&mut self, pos: u64) {
        let n = pos.saturating_sub(self.base).min(self.entries.len() as u64);
        self.entries.drain(..n as usize);
        self.base += n;
    }

    pub fn append(&mut self, entries: Vec<DirEntry>, more: bool) {
        if let Some(last) = entries.last() {
            self.cursor = Some(last.name.clone());
        }
        self.entries.extend(entries);
        self.done = !more;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfs_proto::types::{FileKind, Timestamp};

    fn attr(ino: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::RegularFile,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
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

    fn entries(from: u64, n: u64) -> Vec<DirEntry> {
        (from..from + n)
            .map(|i| DirEntry {
                name: format!("e{i:04}").into_bytes(),
                attr: attr(i),
            })
            .collect()
    }

    #[test]
    fn positions_survive_discarding_and_paging() {
        let mut h = DirHandle::new(attr(1));
        h.append(entries(0, 3), true);
        assert_eq!(h.get(2).unwrap().attr.ino, 0);
        assert_eq!(h.end(), 5);
        h.discard_before(4);
        assert!(h.get(3).is_none());
        assert_eq!(h.get(4).unwrap().attr.ino, 2);
        h.append(entries(3, 2), false);
        assert_eq!(h.get(6).unwrap().attr.ino, 4);
        assert_eq!(h.cursor.as_deref(), Some(&b"e0004"[..]));
        assert!(h.done);
        assert!(!h.reachable(3));
        assert!(h.reachable(0));
        h.rewind();
        assert!(h.reachable(2));
        assert!(h.cursor.is_none());
    }
}
