//! Verified reads of one stored piece.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use dfs_proto::types::PieceId;

use super::{CorruptSet, StoreError, io_err};
use crate::piece_format::{BLOCK_SIZE, FormatError, Trailer};

/// An open piece whose trailer checked out; every read verifies the blocks it touches.
pub struct PieceReader {
    pub(super) piece: PieceId,
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Set once decoded (always, for a reader handed out).
    pub(super) trailer: Option<Trailer>,
    /// Where corruption found is recorded (None: the caller does not want it reported).
    pub(super) corrupt: Option<Arc<CorruptSet>>,
}

impl PieceReader {
    fn trailer(&self) -> &Trailer {
        self.trailer
            .as_ref()
            .expect("readers are handed out with their trailer")
    }

    pub fn piece(&self) -> PieceId {
        self.piece
    }

    /// Data length.
    pub fn len(&self) -> u64 {
        self.trailer().data_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn block_count(&self) -> u64 {
        self.trailer().block_count()
    }

    /// Logs and records damage found at `offset`, and makes the error for it.
    pub(super) fn corrupt(&self, reason: FormatError, offset: u64) -> StoreError {
        let err = StoreError::Corrupt {
            piece: self.piece,
            path: self.path.clone(),
            offset,
            reason,
        };
        if let Some(set) = &self.corrupt {
            tracing::error!("{err}");
            set.insert(self.piece);
        }
        err
    }

    /// Reads whole blocks starting with `first` into `buf` (exactly their bytes) and checks them.
    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let offset = first * BLOCK_SIZE;
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return Err(self.corrupt(FormatError::ShortBlock { block: first, offset }, offset));
            }
            Err(e) => return Err(io_err("read", &self.path)(e)),
        }
        self.trailer().check_blocks(first, buf).map_err(|e| {
            let at = e.offset(offset);
            self.corrupt(e, at)
        })
    }

    /// Reads up to `buf.len()` bytes at `offset` (0 past the end), verifying every block the
    /// range touches. Whole blocks are read straight into `buf`; partial ones through a
    /// one-block buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let len = self.len();
        if offset >= len || buf.is_empty() {
            return Ok(0);
        }
        let end = len.min(offset.saturating_add(buf.len() as u64));
        // Whole blocks inside [offset, end) end here (the piece's partial last block counts
        // as whole when the range reaches the end of the piece).
        let whole_end = if end == len { len } else { end / BLOCK_SIZE * BLOCK_SIZE };
        let mut scratch = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let (block_start, block_end) = self.trailer().block_range(block);
            let out = (pos - offset) as usize;
            if pos == block_start && block_end <= whole_end {
                let n = (whole_end - pos) as usize;
                self.read_blocks(block, &mut buf[out..out + n])?;
                pos = whole_end;
            } else {
                scratch.resize((block_end - block_start) as usize, 0);
                self.read_blocks(block, &mut scratch)?;
                let take = (block_end.min(end) - pos) as usize;
                let from = (pos - block_start) as usize;
                buf[out..out + take].copy_from_slice(&scratch[from..from + take]);
                pos += take as u64;
            }
        }
        Ok((end - offset) as usize)
    }

    /// Fills `buf` from `offset`; fails if the piece ends first.
    pub fn read_exact(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let n = self.read(offset, buf)?;
        if n < buf.len() {
            return Err(io_err("read", &self.path)(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "piece {} holds {} bytes, read of {} at {offset} runs past it",
                    self.piece,
                    self.len(),
                    buf.len()
                ),
            )));
        }
        Ok(())
    }

    /// Verifies up to `count` blocks from `first` (scrubbing); returns the data bytes checked.
    pub fn verify_blocks(&self, first: u64, count: u64) -> Result<u64, StoreError> {
        let last = (first + count).min(self.block_count());
        if first >= last {
            return Ok(0);
        }
        let start = first * BLOCK_SIZE;
        let end = self.trailer().block_range(last - 1).1;
        let mut buf = vec![0u8; (end - start) as usize];
        self.read_blocks(first, &mut buf)?;
        Ok(end - start)
    }
}
