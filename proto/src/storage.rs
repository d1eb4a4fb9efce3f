//! Requests served by storage daemons. File bytes travel raw on the QUIC stream after the
//! request frame (writes) or after the reply frame (reads), never inside a serialized message.

use serde::{Deserialize, Serialize};

use crate::call::service;
use crate::meta::BasePiece;
use crate::types::{NodeUsage, PieceId};

service! {
    /// Everything a storage daemon answers.
    StorageRequest {
        WritePiece => PieceWritten,
        ReadPiece => ReadReply,
        Ping => NodeUsage,
    }
}

/// Writes a new piece. The request frame is followed by segments (a [`SegmentHeader`] then
/// `len` raw bytes), then the end of the stream; the reply comes once the piece is durable.
///
/// With a `base`, the daemon first opens it and answers a `Result<BaseOpened, RemoteError>`
/// frame before it reads any segment: the writer learns at once that the base is there (and
/// stays readable to this write whatever happens to it later), or why not, in which case that
/// error is the only answer.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WritePiece {
    pub piece: PieceId,
    /// Start from a copy of this piece's first `len` bytes (a rewrite of an existing chunk).
    pub base: Option<BasePiece>,
}

/// The base of a [`WritePiece`] is open: the new piece will start with its `len` bytes.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseOpened {
    pub len: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct PieceWritten {
    /// Length of the durable piece.
    pub len: u64,
}

/// Reads `len` bytes at `offset`; the reply frame is followed by exactly `ReadReply::len` bytes
/// (fewer than asked when the piece ends first).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadPiece {
    pub piece: PieceId,
    pub offset: u64,
    pub len: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct ReadReply {
    pub len: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Ping {}

/// Largest segment a writer may send in one piece of a write stream.
pub const MAX_SEGMENT: u32 = 4 << 20;
/// Largest piece a daemon accepts (bounds every offset a client can name).
pub const MAX_PIECE_SIZE: u64 = 1 << 30;
/// Largest read a daemon serves in one request.
pub const MAX_READ: u32 = 16 << 20;

/// Precedes each run of raw bytes in a write stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub offset: u64,
    pub len: u32,
}

impl SegmentHeader {
    pub const SIZE: usize = 12;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.offset.to_be_bytes());
        b[8..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes and bounds-checks a header: the segment must fit in a piece.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, SegmentError> {
        let offset = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(b[8..].try_into().expect("4 bytes"));
        if len > MAX_SEGMENT {
            return Err(SegmentError::TooLong(len));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= MAX_PIECE_SIZE => Ok(SegmentHeader { offset, len }),
            _ => Err(SegmentError::BeyondPiece { offset, len }),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("segment of {0} bytes exceeds the {MAX_SEGMENT}-byte limit")]
    TooLong(u32),
    #[error("segment at offset {offset} (+{len}) lies beyond the largest piece ({MAX_PIECE_SIZE} bytes)")]
    BeyondPiece { offset: u64, len: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips() {
        let h = SegmentHeader {
            offset: 123_456,
            len: 65536,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn segment_header_rejects_oversize_and_overflow() {
        let big = SegmentHeader {
            offset: 0,
            len: MAX_SEGMENT + 1,
        }
        .encode();
        assert_eq!(SegmentHeader::decode(&big), Err(SegmentError::TooLong(MAX_SEGMENT + 1)));
        let wrap = SegmentHeader {
            offset: u64::MAX - 1,
            len: 10,
        }
        .encode();
        assert!(matches!(
            SegmentHeader::decode(&wrap),
            Err(SegmentError::BeyondPiece { .. })
        ));
        let past = SegmentHeader {
            offset: MAX_PIECE_SIZE,
            len: 1,
        }
        .encode();
        assert!(matches!(
            SegmentHeader::decode(&past),
            Err(SegmentError::BeyondPiece { .. })
        ));
    }
}
