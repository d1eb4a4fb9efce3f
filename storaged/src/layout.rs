//! Where a piece lives on disk.
//!
//! Invariant: **no directory under a data dir ever holds more than `fanout` entries** (36 by
//! default). A piece id is written in base `fanout`; the path is the digit count, then one
//! directory per digit, and the last digit is the file name:
//!
//! ```text
//! id 1_000_000, fanout 36 = "lfls" -> pieces/4/l/f/l/s
//! ```
//!
//! The digit-count level holds at most ceil(64 / log2(fanout)) <= fanout entries (fanout >= 16);
//! every other level holds at most `fanout` digits. Temporary files use the same scheme under
//! `tmp/`, keyed by a per-process counter, so the invariant covers them too.

use std::path::{Path, PathBuf};

pub const PIECES_DIR: &str = "pieces";
pub const TMP_DIR: &str = "tmp";
pub const LOCK_FILE: &str = "lock";
/// Records how the data directory is laid out: read with another fanout, every piece would
/// be looked for under another name (piece 36's file is piece 16's path at fanout 16).
pub const MARKER_FILE: &str = "layout";
/// Layout format written into new data directories.
pub const DIR_FORMAT: u32 = 2;
/// A marker longer than this is not one.
const MAX_MARKER_LEN: usize = 4096;

/// The contents of a data directory's layout marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub format: u32,
    pub fanout: u32,
}

impl Marker {
    pub fn encode(&self) -> String {
        format!(
            "# dfs-storaged data directory: how its pieces are laid out. Do not edit.\nformat {}\nfanout {}\n",
            self.format, self.fanout
        )
    }

    /// Parses a marker; the error says what is wrong with it.
    pub fn decode(text: &[u8]) -> Result<Marker, String> {
        if text.len() > MAX_MARKER_LEN {
            return Err(format!("{} bytes, more than any layout marker", text.len()));
        }
        let text = std::str::from_utf8(text).map_err(|_| "not text".to_owned())?;
        let (mut format, mut fanout) = (None, None);
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line.split_once(' ').ok_or_else(|| format!("malformed line {line:?}"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not a number"))?;
            match key {
                "format" => format = Some(value),
                "fanout" => fanout = Some(value),
                other => return Err(format!("unknown setting {other:?}")),
            }
        }
        let marker = Marker {
            format: format.ok_or("no format")?,
            fanout: fanout.ok_or("no fanout")?,
        };
        if marker.format == 0 || marker.format > DIR_FORMAT {
            return Err(format!(
                "layout format {} (this dfs-storaged reads formats up to {DIR_FORMAT})",
                marker.format
            ));
        }
        if !(16..=4096).contains(&marker.fanout) {
            return Err(format!("fanout {} out of range", marker.fanout));
        }
        Ok(marker)
    }
}

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    fanout: u32,
}

impl Layout {
    /// `fanout` must be between 16 and 4096 (the config enforces it).
    pub fn new(root: impl Into<PathBuf>, fanout: u32) -> Self {
        assert!((16..=4096).contains(&fanout), "fanout {fanout} out of range");
        Layout {
            root: root.into(),
            fanout,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pieces_dir(&self) -> PathBuf {
        self.root.join(PIECES_DIR)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    pub fn piece_path(&self, piece: u64) -> PathBuf {
        self.numbered_path(&self.pieces_dir(), piece)
    }

    pub fn temp_path(&self, n: u64) -> PathBuf {
        self.numbered_path(&self.tmp_dir(), n)
    }

    /// Digits of `n` in base `fanout`, most significant first.
    fn digits(&self, mut n: u64) -> Vec<u32> {
        let base = self.fanout as u64;
        let mut d = Vec::with_capacity(16);
        loop {
            d.push((n % base) as u32);
            n /= base;
            if n == 0 {
                break;
            }
        }
        d.reverse();
        d
    }

    fn digit_name(&self, digit: u32) -> String {
        if self.fanout <= 36 {
            char::from_digit(digit, 36).expect("digit < 36").to_string()
        } else {
            digit.to_string()
        }
    }

    fn parse_digit(&self, name: &str) -> Option<u32> {
        let d = if self.fanout <= 36 {
            let mut chars = name.chars();
            let c = chars.next()?;
            if chars.next().is_some() || c.is_ascii_uppercase() {
                return None;
            }
            c.to_digit(36)?
        } else {
            if name.len() > 1 && name.starts_with('0') {
                return None;
            }
            name.parse().ok()?
        };
        (d < self.fanout).then_some(d)
    }

    fn numbered_path(&self, base: &Path, n: u64) -> PathBuf {
        let digits = self.digits(n);
        let mut p = base.join(digits.len().to_string());
        for d in digits {
            p.push(self.digit_name(d));
        }
        p
    }

    /// Inverse of [`Layout::piece_path`] for a path relative to the pieces dir; None for
    /// anything that is not a well-formed piece path.
    pub fn parse_relative(&self, rel: &Path) -> Option<u64> {
        let mut parts = rel.iter().map(|c| c.to_str());
        let count: usize = parts.next()??.parse().ok()?;
        let digits: Vec<u32> = parts
            .map(|p| p.and_then(|s| self.parse_digit(s)))
            .collect::<Option<_>>()?;
        if digits.len() != count || count == 0 || (count > 1 && digits[0] == 0) {
            return None;
        }
        digits.iter().try_fold(0u64, |acc, &d| {
            acc.checked_mul(self.fanout as u64)?.checked_add(d as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_base_fanout_digits() {
        let l = Layout::new("/d", 36);
        assert_eq!(l.piece_path(0), PathBuf::from("/d/pieces/1/0"));
        assert_eq!(l.piece_path(35), PathBuf::from("/d/pieces/1/z"));
        assert_eq!(l.piece_path(36), PathBuf::from("/d/pieces/2/1/0"));
        assert_eq!(l.piece_path(1_000_000), PathBuf::from("/d/pieces/4/l/f/l/s"));
        assert_eq!(l.temp_path(7), PathBuf::from("/d/tmp/1/7"));
        let big = Layout::new("/d", 100);
        assert_eq!(big.piece_path(12_345), PathBuf::from("/d/pieces/3/1/23/45"));
    }

    #[test]
    fn parse_inverts_path() {
        for fanout in [16, 36, 37, 100, 4096] {
            let l = Layout::new("/d", fanout);
            for id in [0, 1, 15, 16, 35, 36, 1295, 1296, 99_999, u32::MAX as u64, u64::MAX] {
                let p = l.piece_path(id);
                let rel = p.strip_prefix(l.pieces_dir()).unwrap();
                assert_eq!(l.parse_relative(rel), Some(id), "fanout {fanout} id {id}");
            }
        }
    }

    #[test]
    fn parse_rejects_strays() {
        let l = Layout::new("/d", 36);
        for bad in [
            "2/0/1",
            "1/A",
            "3/1/2",
            "x/1",
            "1/zz",
            "1",
            "14/1/0/0/0/0/0/0/0/0/0/0/0/0/0",
        ] {
            assert_eq!(l.parse_relative(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn markers_round_trip_and_bad_ones_say_why() {
        let m = Marker { format: 2, fanout: 36 };
        assert_eq!(Marker::decode(m.encode().as_bytes()), Ok(m));
        for (bad, why) in [
            (&b"format 2\n"[..], "no fanout"),
            (b"format 2\nfanout 8\n", "out of range"),
            (b"format 9\nfanout 36\n", "formats up to"),
            (b"format 2\nfanout x\n", "not a number"),
            (b"colour 2\n", "unknown setting"),
            (b"\xff\xfe", "not text"),
        ] {
            let e = Marker::decode(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        assert!(Marker::decode(&vec![b'#'; 5000]).is_err());
    }

    #[test]
    fn every_level_stays_within_fanout() {
        // The digit-count level: u64 needs at most this many digits.
        for fanout in [16u32, 36, 4096] {
            let l = Layout::new("/d", fanout);
            let max_digits = l.digits(u64::MAX).len() as u32;
            assert!(max_digits <= fanout, "fanout {fanout}: {max_digits} digit-count dirs");
        }
    }
}
