//! Background verification of every stored piece, so damage is found (and reported through
//! the heartbeat, for repair) before a client needs the data.
//!
//! Schedule: the first pass starts `min(interval, 60 s)` after the daemon starts; each later
//! pass starts `interval` after the previous one began, or as soon as it ends if it took longer.
//! An interval of 0 disables scrubbing. Reads are paced to at most `bytes_per_sec` on average
//! (the pass sleeps whenever it is ahead of that rate). Disk work runs on the blocking pool, one
//! batch of [`BATCH_BLOCKS`] blocks at a time. Corruption goes into the store's corrupt set,
//! like corruption found by reads. Pieces deleted during the walk are skipped.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::spawn_blocking;
use tokio::time::Instant;

use crate::store::{PieceStore, StoreError};

/// Blocks (64 KiB each) verified per trip to the blocking pool.
const BATCH_BLOCKS: u64 = 16;
/// The first pass starts at most this long after startup.
const FIRST_PASS_DELAY: Duration = Duration::from_secs(60);

pub struct Scrubber {
    pub store: Arc<PieceStore>,
    pub bytes_per_sec: u64,
    pub interval: Duration,
}

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScrubSummary {
    /// Pieces verified, intact or not.
    pub pieces: u64,
    /// Data bytes verified.
    pub bytes: u64,
    /// Pieces found corrupt.
    pub corrupt: u64,
    /// Pieces that could not be read for another reason (disk errors).
    pub errors: u64,
    /// Pieces listed but deleted before their turn.
    pub vanished: u64,
}

impl Scrubber {
    /// Runs passes for the life of the daemon.
    pub async fn run(self) {
        if self.interval.is_zero() {
            tracing::info!("scrubbing disabled (scrub_interval_secs = 0)");
            return;
        }
        let mut next = later(Instant::now(), self.interval.min(FIRST_PASS_DELAY));
        loop {
            tokio::time::sleep_until(next).await;
            let started = Instant::now();
            next = later(started, self.interval);
            match self.pass().await {
                Ok(s) => tracing::info!(
                    "scrub pass done in {:?}: {} pieces, {} bytes verified, {} corrupt, {} unreadable, {} deleted meanwhile",
                    started.elapsed(),
                    s.pieces,
                    s.bytes,
                    s.corrupt,
                    s.errors,
                    s.vanished
                ),
                Err(e) => tracing::error!("scrub pass failed after {:?}: {e}", started.elapsed()),
            }
        }
    }

    /// Verifies every block of every piece stored when the pass starts.
    pub async fn pass(&self) -> Result<ScrubSummary, StoreError> {
        let store = self.store.clone();
        let pieces = spawn_blocking(move || store.inventory()).await.map_err(join_error)??;
        tracing::info!("scrub pass started: {} pieces to verify", pieces.len());
        let mut summary = ScrubSummary::default();
        let pace = Pace::new(self.bytes_per_sec);
        for stored in pieces {
            let piece = stored.piece;
            let store = self.store.clone();
            let reader = match spawn_blocking(move || store.open_reader(piece))
                .await
                .map_err(join_error)?
            {
                Ok(r) => Arc::new(r),
                Err(StoreError::NotFound { .. }) => {
                    summary.vanished += 1;
                    continue;
                }
                Err(StoreError::Corrupt { .. }) => {
                    // Logged and recorded by the store.
                    summary.pieces += 1;
                    summary.corrupt += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("scrub: cannot open piece {piece}: {e}");
                    summary.errors += 1;
                    continue;
                }
            };
            summary.pieces += 1;
            let mut block = 0;
            while block < reader.block_count() {
                let r = reader.clone();
                match spawn_blocking(move || r.verify_blocks(block, BATCH_BLOCKS))
                    .await
                    .map_err(join_error)?
                {
                    Ok(n) => {
                        summary.bytes += n;
                        pace.wait(summary.bytes).await;
                    }
                    Err(StoreError::Corrupt { .. }) => {
                        summary.corrupt += 1;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("scrub: cannot read piece {piece}: {e}");
                        summary.errors += 1;
                        break;
                    }
                }
                block += BATCH_BLOCKS;
            }
        }
        Ok(summary)
    }
}

/// `t + d`, or about 30 years after `t` for intervals too large to add (never, in practice).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(30 * 365 * 86400))
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        op: "scrub",
        path: Default::default(),
        source: std::io::Error::other(format!("storage task failed: {e}")),
    }
}

/// Keeps the average read rate of a pass at or below a limit.
struct Pace {
    started: Instant,
    bytes_per_sec: u64,
}

impl Pace {
    fn new(bytes_per_sec: u64) -> Self {
        Pace {
            started: Instant::now(),
            bytes_per_sec: bytes_per_sec.max(1),
        }
    }

    /// Sleeps until `bytes` read since the start are within the rate.
    async fn wait(&self, bytes: u64) {
        let due = self.started + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece_format::BLOCK_SIZE;
    use std::os::unix::fs::FileExt;

    #[tokio::test]
    async fn pass_finds_damaged_pieces_and_paces_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let len = 3 * BLOCK_SIZE as usize + 10;
        for id in 1..=4u64 {
            let mut w = store.begin_write(id, None).unwrap();
            w.write_at(0, &vec![id as u8; len]).unwrap();
            w.commit().unwrap();
        }
        // Piece 2: a data byte in the last block; piece 3: its footer.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(store.layout().piece_path(2))
            .unwrap();
        f.write_all_at(&[0xff], len as u64 - 1).unwrap();
        let p3 = store.layout().piece_path(3);
        let f3 = std::fs::OpenOptions::new().write(true).open(&p3).unwrap();
        let size = f3.metadata().unwrap().len();
        f3.write_all_at(&[0xff], size - 10).unwrap();

        let scrubber = Scrubber {
            store: store.clone(),
            bytes_per_sec: 4 << 20,
            interval: Duration::from_secs(3600),
        };
        let started = std::time::Instant::now();
        let s = scrubber.pass().await.unwrap();
        assert_eq!(s.pieces, 4);
        assert_eq!(s.corrupt, 2);
        assert_eq!(s.errors, 0);
        assert_eq!(
            s.bytes,
            2 * len as u64,
            "damaged pieces are not counted as verified bytes"
        );
        // ~400 KiB at 4 MiB/s.
        assert!(
            started.elapsed() >= Duration::from_millis(80),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(store.take_corrupt(), vec![2, 3]);
        assert!(store.take_corrupt().is_empty());
    }

    #[tokio::test]
    async fn deleted_pieces_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let mut w = store.begin_write(1, None).unwrap();
        w.write_at(0, b"x").unwrap();
        w.commit().unwrap();
        let scrubber = Scrubber {
            store: store.clone(),
            bytes_per_sec: 1 << 30,
            interval: Duration::from_secs(1),
        };
        assert_eq!(scrubber.pass().await.unwrap().pieces, 1);
        store.delete(1).unwrap();
        let s = scrubber.pass().await.unwrap();
        assert_eq!((s.pieces, s.corrupt, s.errors), (0, 0, 0));
    }
}
