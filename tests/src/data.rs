//! Deterministic test data, so any byte that comes back wrong is reproducible.

use std::io::Write;
use std::path::Path;

/// Writes `len` pseudo-random bytes derived from `seed` to `path`, in bounded pieces.
pub fn write_file(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create"));
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
}

/// The bytes `write_file` would write (for small sizes).
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp");
    let p = dir.path().join("x");
    write_file(&p, len as u64, seed);
    std::fs::read(p).expect("read")
}
