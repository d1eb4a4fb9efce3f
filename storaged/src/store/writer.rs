//! Durable writes of one new piece: a temporary file, checksums, into place, durable (by the
//! piece journal or by fsyncs).

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dfs_proto::meta::BasePiece;
use dfs_proto::types::PieceId;

use super::journal::{Journal, MAX_JOURNALED_FILE};
use super::{IO_CHUNK, PieceStore, StoreError, accounted_len, ensure_parent, io_err, prune_empty_parents, sync_dir};
use crate::piece_format::{self, BLOCK_SIZE};

/// Where an uncommitted piece's bytes live.
pub(super) enum Temp {
    /// An O_TMPFILE inode: it has no name until linked into place, and vanishes if abandoned.
    Unnamed,
    /// A named file in the `tmp/` tree.
    Named(PathBuf),
}

/// The piece a copy-on-write starts from, opened (its trailer checked) when the write starts.
/// Held open, its bytes stay readable whatever happens to its name meanwhile: a move, a trim
/// or another writer's commit may delete the base while the new piece's data is still coming.
/// Its blocks are verified as they are copied: a damaged base fails the write (and is
/// reported) rather than being blessed with fresh checksums.
pub struct OpenBase {
    pub(super) base: BasePiece,
    pub(super) reader: super::PieceReader,
}

impl OpenBase {
    /// Bytes of the base the new piece starts with.
    pub fn len(&self) -> u64 {
        self.base.len
    }

    pub fn is_empty(&self) -> bool {
        self.base.len == 0
    }
}

/// A piece being written into a temporary file; discarded unless committed.
pub struct PieceWriter {
    pub(super) store: Arc<PieceStore>,
    pub(super) piece: PieceId,
    pub(super) file: File,
    pub(super) temp: Temp,
    pub(super) len: u64,
    pub(super) committed: bool,
}

impl PieceWriter {
    pub(super) fn copy_base(&mut self, base: OpenBase) -> Result<(), StoreError> {
        let OpenBase { base, reader: src } = base;
        let available = src.len();
        let want = base.len.min(available);
        if want < base.len {
            tracing::warn!(
                "base piece {} holds {available} bytes, fewer than the {} expected; the rest reads as zeros",
                base.piece,
                base.len
            );
        }
        self.store.check_space(self.piece, want)?;
        let mut buf = vec![0u8; (want as usize).min(IO_CHUNK)];
        let mut copied = 0u64;
        while copied < want {
            let n = ((want - copied) as usize).min(buf.len());
            src.read_exact(copied, &mut buf[..n])?;
            self.file
                .write_all_at(&buf[..n], copied)
                .map_err(|e| self.map_write_error("copy", e))?;
            copied += n as u64;
        }
        if want < base.len {
            self.file
                .set_len(base.len)
                .map_err(|e| self.map_write_error("extend", e))?;
        }
        self.len = base.len;
        Ok(())
    }

    fn map_write_error(&self, op: &'static str, e: io::Error) -> StoreError {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            StoreError::NoSpace {
                piece: self.piece,
                reason: e.to_string(),
            }
        } else {
            io_err(op, &self.store.layout.piece_path(self.piece))(e)
        }
    }

    pub fn piece(&self) -> PieceId {
        self.piece
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let end = offset + data.len() as u64;
        if end > self.len {
            self.store.check_space(self.piece, end - self.len)?;
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.map_write_error("write", e))?;
        self.len = self.len.max(end);
        Ok(())
    }

    /// Appends the checksum trailer, computed over the final data read back (segments may have
    /// come in any order, so only now is every block complete).
    fn write_trailer(&self) -> Result<u64, StoreError> {
        let mut crcs = Vec::with_capacity(piece_format::block_count(self.len) as usize);
        let mut buf = vec![0u8; (self.len as usize).min(IO_CHUNK)];
        let mut pos = 0u64;
        while pos < self.len {
            let n = ((self.len - pos) as usize).min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(|e| self.map_write_error("read back", e))?;
            crcs.extend(buf[..n].chunks(BLOCK_SIZE as usize).map(piece_format::block_crc));
            pos += n as u64;
        }
        let trailer = piece_format::encode_trailer(self.len, &crcs, self.piece);
        self.file
            .write_all_at(&trailer, self.len)
            .map_err(|e| self.map_write_error("write checksums", e))?;
        Ok(self.len + trailer.len() as u64)
    }

    /// Writes the checksums, makes the piece durable under its final name and returns its
    /// (data) length.
    ///
    /// A new piece of at most [`MAX_JOURNALED_FILE`] bytes is linked into place and then
    /// appended to the piece journal; any other (or one the journal refuses) is fsync'd, linked,
    /// and its directory fsync'd. Either way it is durable when this returns.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        let file_len = self.write_trailer()?;
        let final_path = self.store.layout.piece_path(self.piece);
        let replaced = fs::metadata(&final_path).ok().map(|m| accounted_len(m.len()));
        // A rewrite of an existing piece is never journaled: a replay must not bring back an
        // older version over a newer file (journal.rs).
        let journal = (self.store.journal.as_ref()).filter(|_| replaced.is_none() && file_len <= MAX_JOURNALED_FILE);
        if journal.is_none() {
            self.file.sync_all().map_err(|e| self.map_write_error("fsync", e))?;
        }
        // A concurrent delete may prune the directory between creating and linking: retry.
        let mut attempts = 0;
        loop {
            // New directories are made durable at once, journal or not: they are rare (one per
            // `fanout` pieces), and a later fsync'd piece in the same directory relies on them.
            ensure_parent(&final_path, true)?;
            let placed = match &self.temp {
                Temp::Unnamed => link_into_place(&self.file, &final_path),
                Temp::Named(tmp) => fs::rename(tmp, &final_path),
            };
            match placed {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound && attempts < super::MAX_PRUNE_RETRIES => {
                    attempts += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(io_err("put into place", &final_path)(e)),
            }
        }
        self.committed = true;
        match journal {
            None => sync_dir(final_path.parent().expect("piece has a parent"))?,
            Some(journal) => {
                if let Err(e) = self.journal_or_sync(journal, file_len, &final_path) {
                    // Not durable, and the writer is told so: nothing of it may stay visible.
                    let _ = fs::remove_file(&final_path);
                    return Err(e);
                }
            }
        }
        self.store.account_new_piece(self.len, replaced);
        // A damaged copy this one replaced is gone.
        self.store.corrupt.remove(self.piece);
        if let Temp::Named(tmp) = &self.temp {
            prune_empty_parents(tmp, &self.store.layout.tmp_dir());
        }
        Ok(self.len)
    }

    /// Makes a piece just linked into place durable through the journal, or, if the journal
    /// refuses it, by fsyncs of the file and of its directory.
    fn journal_or_sync(&self, journal: &Journal, file_len: u64, path: &Path) -> Result<(), StoreError> {
        let mut bytes = vec![0u8; file_len as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| self.map_write_error("read back", e))?;
        let Err(refused) = journal.append(self.piece, bytes) else {
            return Ok(());
        };
        tracing::debug!("piece {}: not journaled ({refused}); fsync instead", self.piece);
        self.file.sync_all().map_err(|e| self.map_write_error("fsync", e))?;
        sync_dir(path.parent().expect("piece has a parent"))
    }
}

impl Drop for PieceWriter {
    fn drop(&mut self) {
        if let (false, Temp::Named(tmp)) = (self.committed, &self.temp) {
            let _ = fs::remove_file(tmp);
            prune_empty_parents(tmp, &self.store.layout.tmp_dir());
        }
    }
}

/// Opens an unnamed temporary file on the file system of `dir`.
pub(super) fn open_unnamed(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// Gives an unnamed temporary file its final name (replacing a leftover of the same piece).
fn link_into_place(file: &File, path: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let to = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    for _ in 0..2 {
        // SAFETY: valid NUL-terminated paths; AT_SYMLINK_FOLLOW resolves the /proc link to the
        // open file (no capability needed, unlike AT_EMPTY_PATH).
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::AlreadyExists {
            return Err(e);
        }
        // A rewrite of the same piece id (a retried write): the new content wins.
        fs::remove_file(path)?;
    }
    Err(io::Error::from(ErrorKind::AlreadyExists))
}

/// Checks that unnamed temporary files can be created and linked here.
pub(super) fn probe_unnamed_temps(root: &Path) -> io::Result<()> {
    let file = open_unnamed(root)?;
    let probe = root.join(".tmpfile-probe");
    let _ = fs::remove_file(&probe);
    link_into_place(&file, &probe)?;
    fs::remove_file(&probe)
}
