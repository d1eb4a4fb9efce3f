//! Write errors reported the way Linux reports writeback errors for local files (errseq): a
//! failure of acknowledged writes is recorded on the inode with a sequence number; every open
//! file description that was open for writing when it happened hears about it once, at its
//! next `fsync()` or `close()`, whoever else heard about it first.
//!
//! A close is a FUSE FLUSH, sent once for every descriptor closed, and it names the closing
//! process' file table (the lock owner): a forked child closing an inherited descriptor and
//! its parent closing its own are two closes of one open file description, and each hears of
//! the failure. `fsync()` carries no such owner and is tracked per open file description; a
//! failure an fsync reported is not reported again by closes of that description (whichever
//! comes first), and fsync reports on any descriptor, as on Linux. Only descriptors open for
//! writing hear of failures at close (as NFS does).

use std::collections::HashMap;
use std::sync::Mutex;

use dfs_proto::types::Ino;

use crate::error::{FsError, FsResult};

/// The write failures of one inode on this mount.
#[derive(Debug, Default)]
pub struct ErrorSeq {
    inner: Mutex<SeqState>,
}

#[derive(Debug, Default)]
struct SeqState {
    /// Failures so far; the latest is `last`.
    seq: u64,
    last: Option<FsError>,
    /// Whether any open file description has been told of `last`.
    seen: bool,
}

impl ErrorSeq {
    /// Records a failure of writes that were acknowledged to applications.
    pub fn record(&self, error: FsError) {
        let mut s = self.inner.lock().expect("errseq");
        s.seq += 1;
        s.last = Some(error);
        s.seen = false;
    }

    /// Where a description opened now starts: failures before it are not its own, unless
    /// nobody has been told of the last one yet (then the next opener hears it, as on Linux).
    pub fn sample(&self) -> u64 {
        let s = self.inner.lock().expect("errseq");
        if s.seen || s.last.is_none() { s.seq } else { s.seq - 1 }
    }

    /// The failure a reader whose cursor is `seen` has not been told of, advancing the cursor.
    fn check(&self, seen: &mut u64) -> FsResult<()> {
        let mut s = self.inner.lock().expect("errseq");
        if s.seq <= *seen {
            return Ok(());
        }
        *seen = s.seq;
        s.seen = true;
        Err(s.last.clone().expect("a failure is recorded with its error"))
    }
}

/// One open file description on this mount (one FUSE file handle).
#[derive(Debug)]
pub struct OpenHandle {
    pub ino: Ino,
    /// Opened for writing (only those hear of write failures).
    pub writable: bool,
    /// Per closing process (lock owner): the last failure it was told of at close; and
    /// where a process not in the map starts (at the open, or the last failure fsync reported).
    closes: Mutex<(HashMap<u64, u64>, u64)>,
    /// The last failure an fsync of this description was told of.
    fsyncs: Mutex<u64>,
}

impl OpenHandle {
    pub fn new(ino: Ino, writable: bool, errors: &ErrorSeq) -> Self {
        let opened_at = errors.sample();
        OpenHandle {
            ino,
            writable,
            closes: Mutex::new((HashMap::new(), opened_at)),
            fsyncs: Mutex::new(opened_at),
        }
    }

    /// What `close()` by the process owning `owner` reports.
    pub fn check_close(&self, owner: u64, errors: &ErrorSeq) -> FsResult<()> {
        if !self.writable {
            return Ok(());
        }
        let mut closes = self.closes.lock().expect("closes");
        let (seen, base) = &mut *closes;
        let seen = seen.entry(owner).or_insert(*base);
        errors.check(seen)
    }

    /// What `fsync()` of this description reports. What it reports, no close of this
    /// description reports again.
    pub fn check_fsync(&self, errors: &ErrorSeq) -> FsResult<()> {
        let mut fsyncs = self.fsyncs.lock().expect("fsyncs");
        let result = errors.check(&mut fsyncs);
        if result.is_err() {
            let mut closes = self.closes.lock().expect("closes");
            let (seen, base) = &mut *closes;
            *base = (*base).max(*fsyncs);
            for s in seen.values_mut() {
                *s = (*s).max(*fsyncs);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eio(what: &str) -> FsError {
        FsError::io(what.to_owned())
    }

    #[test]
    fn every_writer_open_at_the_failure_hears_it_once_and_later_openers_do_not() {
        let errors = ErrorSeq::default();
        let p1 = OpenHandle::new(7, true, &errors);
        let p2 = OpenHandle::new(7, true, &errors);
        let reader = OpenHandle::new(7, false, &errors);
        let fsync_reader = OpenHandle::new(7, false, &errors);
        errors.record(eio("daemon gone"));
        // P2 closes first: it hears it; that does not use it up for P1.
        assert!(p2.check_close(2, &errors).is_err());
        assert!(p2.check_close(2, &errors).is_ok(), "told once");
        assert!(reader.check_close(3, &errors).is_ok(), "not a writer");
        assert!(
            fsync_reader.check_fsync(&errors).is_err(),
            "fsync reports on any descriptor"
        );
        // A forked child closing P1's inherited descriptor, then P1 itself: both hear it.
        assert!(p1.check_close(10, &errors).is_err());
        assert!(p1.check_close(1, &errors).is_err());
        // fsync is tracked per description.
        assert!(p1.check_fsync(&errors).is_err());
        assert!(p1.check_fsync(&errors).is_ok());
        // Once an fsync reported it, closes of that description do not report it again.
        let p3 = OpenHandle::new(7, true, &errors);
        errors.record(eio("again"));
        assert!(p3.check_fsync(&errors).is_err());
        assert!(p3.check_close(1, &errors).is_ok());
        assert!(p3.check_close(2, &errors).is_ok());
        let later = OpenHandle::new(7, true, &errors);
        assert!(later.check_close(1, &errors).is_ok(), "opened after it was reported");
        assert!(later.check_fsync(&errors).is_ok());
    }

    #[test]
    fn a_failure_nobody_heard_of_goes_to_the_next_opener() {
        let errors = ErrorSeq::default();
        errors.record(eio("background commit"));
        let h = OpenHandle::new(7, true, &errors);
        assert!(h.check_fsync(&errors).is_err());
        let h2 = OpenHandle::new(7, true, &errors);
        assert!(h2.check_fsync(&errors).is_ok(), "already heard by someone");
        errors.record(eio("again"));
        assert!(h2.check_close(5, &errors).is_err());
        assert!(
            h.check_close(5, &errors).is_err(),
            "the second failure is news to h's closer"
        );
    }
}
