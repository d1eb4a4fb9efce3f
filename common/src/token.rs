//! Tokens that tell one round of a log from the next (the metaserver's write-ahead log, a
//! storage daemon's piece journal): records carry the token of their round, and a round
//! starts with a token unlike the one before, so records of an earlier round are never
//! mistaken for this one's.

/// A nonzero token unlike `previous`, from the standard library's per-process random hash
/// keys and the time.
pub fn fresh_token(previous: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(previous);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let token = h.finish();
        if token != previous && token != 0 {
            return token;
        }
    }
}
