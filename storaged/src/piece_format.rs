//! The on-disk format of a piece file: the piece's data, a CRC32C of every 64 KiB block of it,
//! and a fixed footer, all in the one file (no sidecar files: the fanout invariant counts
//! every entry).
//!
//! ```text
//! data (data_len bytes)
//! crc[0..n]   u32 LE each; n = ceil(data_len / 64 KiB), the last block may be partial
//! footer      32 bytes, little endian:
//!             magic "DFSP" | version u16 (2) | reserved u16 (0) | block_size u32 (65536)
//!             | data_len u64 | piece id u64 | trailer_crc u32
//! ```
//!
//! `trailer_crc` is the CRC32C of the crc array followed by the footer up to it, so a truncated
//! or garbled trailer is detected as surely as a damaged block. The piece id says which piece
//! the file holds: a file found under another piece's name (a data directory read with another
//! fanout, a file copied by hand) is refused as corrupt instead of served as that piece. The
//! file length is a function of the data length ([`file_len`]), and the data length can be
//! recovered from the file length alone ([`data_len_from_file_len`]): listing the store needs
//! no file opened.
//!
//! Version 1 files (a 24-byte footer without the piece id, written before version 2) are still
//! read and verified; new pieces are always written as version 2.
//!
//! Everything here is plain computation over bytes; the store does the I/O.

/// Bytes covered by one checksum.
pub const BLOCK_SIZE: u64 = 64 << 10;
/// Footer of the pieces written now (version 2).
pub const FOOTER_LEN: u64 = 32;
/// Footer of version 1 pieces (no piece id).
pub const FOOTER_LEN_V1: u64 = 24;
/// The most bytes a reader needs from the end of a file to find its footer.
pub const MAX_FOOTER_LEN: u64 = FOOTER_LEN;
pub const MAGIC: [u8; 4] = *b"DFSP";
pub const VERSION: u16 = 2;
const CRC_LEN: u64 = 4;

/// Why a piece file's trailer or data does not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("file length {file_len} fits no data length with a valid trailer")]
    BadFileLength { file_len: u64 },
    #[error("trailer has no piece footer (magic {found:02x?})")]
    BadMagic { found: [u8; 4] },
    #[error("trailer format version {0} is not supported")]
    BadVersion(u16),
    #[error("trailer block size {0} is not supported")]
    BadBlockSize(u32),
    #[error("trailer says {data_len} data bytes but the file holds {file_len} bytes")]
    LengthMismatch { data_len: u64, file_len: u64 },
    #[error("trailer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    TrailerChecksum { stored: u32, computed: u32 },
    #[error("the file holds piece {found}, not piece {expected} (misplaced)")]
    WrongPiece { expected: u64, found: u64 },
    #[error(
        "checksum mismatch in block {block} (bytes {offset}..{end}): stored {stored:#010x}, computed {computed:#010x}"
    )]
    BlockChecksum {
        block: u64,
        offset: u64,
        end: u64,
        stored: u32,
        computed: u32,
    },
    #[error("file ends early: block {block} at offset {offset} cannot be read whole")]
    ShortBlock { block: u64, offset: u64 },
}

impl FormatError {
    /// Offset in the piece file where the damage was found.
    pub fn offset(&self, data_len: u64) -> u64 {
        match self {
            FormatError::BlockChecksum { offset, .. } | FormatError::ShortBlock { offset, .. } => *offset,
            _ => data_len,
        }
    }
}

/// Number of checksummed blocks holding `data_len` bytes.
pub fn block_count(data_len: u64) -> u64 {
    data_len.div_ceil(BLOCK_SIZE)
}

/// Bytes after the data: the crc array and the footer.
pub fn trailer_len(data_len: u64) -> u64 {
    block_count(data_len) * CRC_LEN + FOOTER_LEN
}

/// Length of the file holding a piece of `data_len` bytes.
pub fn file_len(data_len: u64) -> u64 {
    data_len + trailer_len(data_len)
}

/// Inverse of [`file_len`]; None for a length no well-formed piece file has.
pub fn data_len_from_file_len(file_len: u64) -> Option<u64> {
    let body = file_len.checked_sub(FOOTER_LEN)?;
    let full = body / (BLOCK_SIZE + CRC_LEN);
    let rest = body % (BLOCK_SIZE + CRC_LEN);
    let data_len = match rest {
        0 => full * BLOCK_SIZE,
        // A partial last block: at least one data byte plus its crc.
        r if r > CRC_LEN => full * BLOCK_SIZE + (r - CRC_LEN),
        _ => return None,
    };
    Some(data_len)
}

/// The checksum of one block's bytes.
pub fn block_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The bytes following the data of piece `piece` whose blocks have checksums `crcs`.
pub fn encode_trailer(data_len: u64, crcs: &[u32], piece: u64) -> Vec<u8> {
    assert_eq!(crcs.len() as u64, block_count(data_len), "one crc per block");
    let mut out = Vec::with_capacity(trailer_len(data_len) as usize);
    for crc in crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&piece.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A piece file's footer, found from its last bytes: how long the whole trailer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    version: u16,
    data_len: u64,
}

impl Footer {
    fn len(&self) -> u64 {
        if self.version == 1 { FOOTER_LEN_V1 } else { FOOTER_LEN }
    }

    /// Bytes at the end of the file holding the trailer (the slice [`Trailer::decode`] takes).
    pub fn tail_len(&self) -> u64 {
        block_count(self.data_len) * CRC_LEN + self.len()
    }

    /// Finds the footer of a file of `file_len` bytes in its last bytes (`end`, at most
    /// [`MAX_FOOTER_LEN`] of them, fewer only if the file is shorter).
    pub fn find(file_len: u64, end: &[u8]) -> Result<Footer, FormatError> {
        let at = |len: u64| -> Option<&[u8]> {
            let len = len as usize;
            (end.len() >= len && file_len >= len as u64).then(|| &end[end.len() - len..])
        };
        let parse = |footer: &[u8], version: u16| -> Option<Result<Footer, FormatError>> {
            let magic: [u8; 4] = footer[0..4].try_into().expect("4 bytes");
            let found = u16::from_le_bytes(footer[4..6].try_into().expect("2 bytes"));
            if magic != MAGIC || found != version {
                return None;
            }
            let block_size = u32::from_le_bytes(footer[8..12].try_into().expect("4 bytes"));
            if block_size as u64 != BLOCK_SIZE {
                return Some(Err(FormatError::BadBlockSize(block_size)));
            }
            let data_len = u64::from_le_bytes(footer[12..20].try_into().expect("8 bytes"));
            let footer = Footer { version, data_len };
            if data_len.checked_add(footer.tail_len()) != Some(file_len) {
                return Some(Err(FormatError::LengthMismatch { data_len, file_len }));
            }
            Some(Ok(footer))
        };
        let v2 = at(FOOTER_LEN).and_then(|f| parse(f, 2));
        if let Some(Ok(footer)) = v2 {
            return Ok(footer);
        }
        // A version 1 file whose last bytes happen to look like a version 2 footer is still
        // read as what it is.
        if let Some(Ok(footer)) = at(FOOTER_LEN_V1).and_then(|f| parse(f, 1)) {
            return Ok(footer);
        }
        if let Some(Err(e)) = v2 {
            return Err(e);
        }
        if let Some(found) = at(FOOTER_LEN_V1).and_then(|f| parse(f, 1)) {
            return found;
        }
        // Neither footer: say what is there instead.
        let Some(v1) = at(FOOTER_LEN_V1) else {
            return Err(FormatError::BadFileLength { file_len });
        };
        let v2 = at(FOOTER_LEN).filter(|f| f[0..4] == MAGIC);
        match (v2, v1[0..4] == MAGIC) {
            (Some(f), _) => Err(FormatError::BadVersion(u16::from_le_bytes([f[4], f[5]]))),
            (None, true) => Err(FormatError::BadVersion(u16::from_le_bytes([v1[4], v1[5]]))),
            (None, false) => Err(FormatError::BadMagic {
                found: v1[0..4].try_into().expect("4 bytes"),
            }),
        }
    }
}

/// A piece file's validated trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    data_len: u64,
    crcs: Vec<u32>,
}

impl Trailer {
    /// Parses and checks the trailer of piece `piece`: the last [`Footer::tail_len`] bytes of
    /// a file of `file_len` bytes whose footer is `footer`.
    pub fn decode(file_len: u64, footer: Footer, tail: &[u8], piece: u64) -> Result<Trailer, FormatError> {
        if tail.len() as u64 != footer.tail_len() || footer.data_len + footer.tail_len() != file_len {
            return Err(FormatError::BadFileLength { file_len });
        }
        let footer_len = footer.len() as usize;
        let (covered, stored) = tail.split_at(tail.len() - 4);
        let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(covered);
        if stored != computed {
            return Err(FormatError::TrailerChecksum { stored, computed });
        }
        let crc_bytes = &tail[..tail.len() - footer_len];
        if footer.version >= 2 {
            let f = &tail[tail.len() - footer_len..];
            let found = u64::from_le_bytes(f[20..28].try_into().expect("8 bytes"));
            if found != piece {
                return Err(FormatError::WrongPiece { expected: piece, found });
            }
        }
        let crcs = crc_bytes
            .chunks_exact(CRC_LEN as usize)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Trailer {
            data_len: footer.data_len,
            crcs,
        })
    }

    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    pub fn block_count(&self) -> u64 {
        self.crcs.len() as u64
    }

    /// Byte range `[start, end)` of a block.
    pub fn block_range(&self, block: u64) -> (u64, u64) {
        let start = block * BLOCK_SIZE;
        (start, (start + BLOCK_SIZE).min(self.data_len))
    }

    /// Checks the bytes of `block` (all of them, as [`Trailer::block_range`] gives).
    pub fn check_block(&self, block: u64, data: &[u8]) -> Result<(), FormatError> {
        let (offset, end) = self.block_range(block);
        debug_assert_eq!(data.len() as u64, end - offset, "block {block} read whole");
        let stored = self.crcs[block as usize];
        let computed = block_crc(data);
        if stored != computed {
            return Err(FormatError::BlockChecksum {
                block,
                offset,
                end,
                stored,
                computed,
            });
        }
        Ok(())
    }

    /// Checks a run of whole blocks starting with `first` (the last one may be the piece's
    /// partial last block).
    pub fn check_blocks(&self, first: u64, data: &[u8]) -> Result<(), FormatError> {
        for (i, chunk) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            self.check_block(first + i as u64, chunk)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crcs_of(data: &[u8]) -> Vec<u32> {
        data.chunks(BLOCK_SIZE as usize).map(block_crc).collect()
    }

    const PIECE: u64 = 77;

    fn file_of(data: &[u8]) -> Vec<u8> {
        let mut f = data.to_vec();
        f.extend(encode_trailer(data.len() as u64, &crcs_of(data), PIECE));
        f
    }

    /// A piece file as version 1 wrote it (no piece id).
    fn v1_file_of(data: &[u8]) -> Vec<u8> {
        let mut f = data.to_vec();
        let mut trailer = Vec::new();
        for crc in crcs_of(data) {
            trailer.extend_from_slice(&crc.to_le_bytes());
        }
        trailer.extend_from_slice(&MAGIC);
        trailer.extend_from_slice(&1u16.to_le_bytes());
        trailer.extend_from_slice(&0u16.to_le_bytes());
        trailer.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        trailer.extend_from_slice(&(data.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c(&trailer);
        trailer.extend_from_slice(&crc.to_le_bytes());
        f.extend(trailer);
        f
    }

    fn decode_as(f: &[u8], piece: u64) -> Result<Trailer, FormatError> {
        let file_len = f.len() as u64;
        let end = &f[f.len().saturating_sub(MAX_FOOTER_LEN as usize)..];
        let footer = Footer::find(file_len, end)?;
        let tail = footer.tail_len();
        Trailer::decode(file_len, footer, &f[(file_len - tail) as usize..], piece)
    }

    fn decode_file(f: &[u8]) -> Result<Trailer, FormatError> {
        decode_as(f, PIECE)
    }

    #[test]
    fn a_file_holding_another_piece_is_refused_and_version_1_is_still_read() {
        let data = vec![5u8; 70_000];
        let f = file_of(&data);
        assert_eq!(
            decode_as(&f, PIECE + 1),
            Err(FormatError::WrongPiece {
                expected: PIECE + 1,
                found: PIECE
            })
        );
        let old = v1_file_of(&data);
        assert_eq!(
            old.len() as u64,
            file_len(data.len() as u64) - (FOOTER_LEN - FOOTER_LEN_V1)
        );
        let t = decode_as(&old, 12345).expect("version 1 has no piece id to check");
        assert_eq!(t.data_len(), data.len() as u64);
        t.check_blocks(0, &data).unwrap();
        for i in data.len()..old.len() {
            let mut g = old.clone();
            g[i] ^= 0x10;
            assert!(decode_file(&g).is_err(), "flipped byte {i} of a version 1 trailer");
        }
    }

    #[test]
    fn file_length_round_trips() {
        let b = BLOCK_SIZE;
        for len in [0, 1, 2, 3, 4, 5, 100, b - 1, b, b + 1, 3 * b, 3 * b + 7, 1 << 30] {
            assert_eq!(data_len_from_file_len(file_len(len)), Some(len), "len {len}");
        }
        assert_eq!(file_len(0), FOOTER_LEN);
        assert_eq!(file_len(b), b + 4 + FOOTER_LEN);
        // Lengths no piece file has: too short, or a "partial block" of only crc bytes.
        for bad in [0, 1, FOOTER_LEN - 1, FOOTER_LEN + 1, FOOTER_LEN + 4, file_len(b) + 3] {
            assert_eq!(data_len_from_file_len(bad), None, "file length {bad}");
        }
    }

    #[test]
    fn trailer_round_trips_and_checks_blocks() {
        let data: Vec<u8> = (0..(2 * BLOCK_SIZE + 1000)).map(|i| (i * 7 % 251) as u8).collect();
        let f = file_of(&data);
        assert_eq!(f.len() as u64, file_len(data.len() as u64));
        let t = decode_file(&f).unwrap();
        assert_eq!(t.data_len(), data.len() as u64);
        assert_eq!(t.block_count(), 3);
        assert_eq!(t.block_range(2), (2 * BLOCK_SIZE, data.len() as u64));
        t.check_blocks(0, &data).unwrap();
        t.check_block(2, &data[2 * BLOCK_SIZE as usize..]).unwrap();
        let mut bad = data.clone();
        bad[BLOCK_SIZE as usize + 5] ^= 1;
        assert!(matches!(
            t.check_blocks(0, &bad),
            Err(FormatError::BlockChecksum { block: 1, offset, .. }) if offset == BLOCK_SIZE
        ));
    }

    #[test]
    fn empty_piece_has_only_a_footer() {
        let f = file_of(&[]);
        assert_eq!(f.len() as u64, FOOTER_LEN);
        let t = decode_file(&f).unwrap();
        assert_eq!((t.data_len(), t.block_count()), (0, 0));
    }

    #[test]
    fn any_damaged_trailer_byte_is_detected() {
        let data = vec![9u8; BLOCK_SIZE as usize + 3];
        let f = file_of(&data);
        for i in data.len()..f.len() {
            for bit in [0x01, 0x80] {
                let mut g = f.clone();
                g[i] ^= bit;
                assert!(decode_file(&g).is_err(), "flipped bit {bit:#x} of byte {i}");
            }
        }
    }

    #[test]
    fn truncated_or_missing_trailer_is_detected() {
        let data = vec![1u8; 1000];
        let f = file_of(&data);
        for cut in 1..=f.len() - data.len() {
            assert!(decode_file(&f[..f.len() - cut]).is_err(), "cut {cut}");
        }
        // A bare data file (no trailer at all).
        assert!(decode_file(&vec![0u8; 4096]).is_err());
        assert!(decode_file(&[]).is_err());
    }

    #[test]
    fn wrong_length_in_footer_is_detected() {
        // A well-formed trailer for 1000 bytes appended after 999: the length does not add up.
        let mut f = vec![0u8; 999];
        f.extend(encode_trailer(1000, &[block_crc(&[0u8; 1000])], PIECE));
        assert!(decode_file(&f).is_err());
    }
}
