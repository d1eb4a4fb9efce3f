//! Carries out the metaserver's copy orders (repairs, moves): fetch a piece from another daemon
//! with ReadPiece requests and store it as a fresh, checksummed, durable piece.
//!
//! Orders arrive with heartbeat replies ([`Copier::submit`]); an order for a piece already being
//! copied is ignored. At most [`MAX_RUNNING`] copies run at once, the rest wait their turn.
//! Sources are tried in the order given, failing over on any error or timeout. Outcomes wait in
//! the copier until membership takes them for the next heartbeat ([`Copier::take_done`]).
//! The source verifies its checksums when serving; the copy gets its own when committed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dfs_proto::meta::{CopyDone, CopyOrder};
use dfs_proto::types::{NodeAddr, PieceId};
use dfs_proto::{Peer, PeerMap, RpcError};
use quinn::Endpoint;
use tokio::sync::Semaphore;
use tokio::task::spawn_blocking;

use crate::store::{PieceStore, PieceWriter, StoreError};

/// Copies running at once.
pub const MAX_RUNNING: usize = 4;
/// Bytes asked for in one ReadPiece request (the most a copy holds in memory, twice: one
/// block being written while the next is fetched).
const FETCH_BLOCK: u32 = 4 << 20;
/// Deadline of each request to a source, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading piece {piece} from {node}: {source}")]
    Fetch {
        piece: PieceId,
        node: String,
        #[source]
        source: RpcError,
    },
    #[error("{node} did not answer a read of piece {piece} at offset {offset} within {timeout:?}")]
    Timeout {
        piece: PieceId,
        node: String,
        offset: u64,
        timeout: Duration,
    },
    #[error("{node} holds {got} bytes of piece {piece}, expected {expected}")]
    WrongLength {
        piece: PieceId,
        node: String,
        got: u64,
        expected: u64,
    },
    #[error("storing piece {piece} copied from {node}: {source}")]
    Store {
        piece: PieceId,
        node: String,
        #[source]
        source: StoreError,
    },
    #[error("storing piece {piece} copied from {node}: storage task failed: {reason}")]
    Task {
        piece: PieceId,
        node: String,
        reason: String,
    },
}

#[derive(Default)]
struct State {
    /// Pieces with a copy queued or running.
    running: HashSet<PieceId>,
    /// Outcomes not yet taken for a heartbeat.
    done: Vec<CopyDone>,
}

struct Inner {
    /// Woken whenever a copy finishes, so its outcome is reported (and the next orders
    /// fetched) without waiting for the next heartbeat.
    finished: tokio::sync::Notify,
    store: Arc<PieceStore>,
    slots: Semaphore,
    state: Mutex<State>,
    peers: PeerMap,
}

/// Cheap to clone; all clones share the queue and the outcomes.
#[derive(Clone)]
pub struct Copier {
    inner: Arc<Inner>,
}

impl Copier {
    /// `endpoint` must be able to connect out (it carries a client configuration).
    pub fn new(store: Arc<PieceStore>, endpoint: Endpoint) -> Self {
        Copier {
            inner: Arc::new(Inner {
                finished: tokio::sync::Notify::new(),
                store,
                slots: Semaphore::new(MAX_RUNNING),
                state: Mutex::new(State::default()),
                peers: PeerMap::new(endpoint, CONNECT_TIMEOUT),
            }),
        }
    }

    /// Queues copy orders; orders for pieces already queued or running are ignored.
    pub fn submit(&self, orders: Vec<CopyOrder>) {
        for order in orders {
            if !self
                .inner
                .state
                .lock()
                .expect("copier state")
                .running
                .insert(order.piece)
            {
                tracing::debug!("copy of piece {} already under way", order.piece);
                continue;
            }
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let piece = order.piece;
                let outcome = {
                    let _slot = inner.slots.acquire().await.expect("semaphore never closed");
                    inner.copy(&order).await
                };
                let mut state = inner.state.lock().expect("copier state");
                state.running.remove(&piece);
                // A newer outcome for the same piece supersedes one not yet reported.
                state.done.retain(|d| d.piece != piece);
                state.done.push(CopyDone { piece, outcome });
                drop(state);
                inner.finished.notify_one();
            });
        }
    }

    /// Waits until a copy finishes (returns at once if one finished since the last wait).
    pub async fn finished(&self) {
        self.inner.finished.notified().await
    }

    /// Outcomes finished since the last call.
    pub fn take_done(&self) -> Vec<CopyDone> {
        std::mem::take(&mut self.inner.state.lock().expect("copier state").done)
    }

    /// Copies queued or running.
    pub fn in_progress(&self) -> usize {
        self.inner.state.lock().expect("copier state").running.len()
    }
}

impl Inner {
    fn peer(&self, node: &NodeAddr) -> Arc<Peer> {
        self.peers.get(node)
    }

    /// Makes the copy; the error message names every source tried and why it failed.
    async fn copy(&self, order: &CopyOrder) -> Result<u64, String> {
        let piece = order.piece;
        let store = self.store.clone();
        match spawn_blocking(move || store.verified_len(piece)).await {
            Ok(Ok(len)) if len == order.len => {
                tracing::info!("piece {piece} ({len} bytes) is already here and intact: nothing to copy");
                return Ok(len);
            }
            Ok(Ok(len)) => {
                tracing::warn!(
                    "piece {piece} is here with {len} bytes, {} expected: copying it again",
                    order.len
                )
            }
            Ok(Err(StoreError::NotFound { .. })) => {}
            Ok(Err(e)) => tracing::warn!("piece {piece} is here but unusable ({e}): copying it again"),
            Err(e) => tracing::warn!("checking for piece {piece} here failed ({e}): copying it"),
        }
        if order.sources.is_empty() {
            let msg = format!("copy of piece {piece}: no source given");
            tracing::error!("{msg}");
            return Err(msg);
        }
        let mut failures = Vec::new();
        for source in &order.sources {
            let started = tokio::time::Instant::now();
            match self.copy_from(source, order).await {
                Ok(len) => {
                    tracing::info!(
                        "copied piece {piece} ({len} bytes) from {source} in {:?}",
                        started.elapsed()
                    );
                    return Ok(len);
                }
                Err(e) => {
                    tracing::warn!("copy of piece {piece} from {source} failed: {e}");
                    failures.push(e.to_string());
                }
            }
        }
        let msg = format!(
            "copy of piece {piece} failed from every source: {}",
            failures.join("; ")
        );
        tracing::error!("{msg}");
        Err(msg)
    }

    async fn copy_from(&self, source: &NodeAddr, order: &CopyOrder) -> Result<u64, CopyError> {
        let piece = order.piece;
        let node = source.to_string();
        let peer = self.peer(source);
        let store_err = |source: StoreError| CopyError::Store {
            piece,
            node: node.clone(),
            source,
        };
        let task_err = |e: tokio::task::JoinError| CopyError::Task {
            piece,
            node: node.clone(),
            reason: e.to_string(),
        };
        let store = self.store.clone();
        let mut writer = Some(
            spawn_blocking(move || store.begin_write(piece, None))
                .await
                .map_err(task_err)?
                .map_err(store_err)?,
        );
        let mut offset = 0u64;
        // The disk write of one block overlaps fetching the next.
        let mut writing: Option<tokio::task::JoinHandle<Result<PieceWriter, StoreError>>> = None;
        loop {
            // Exactly the first `order.len` bytes: after a truncate the chunk's length is less
            // than its piece file's, and the bytes past it are not part of the file.
            if offset == order.len {
                break;
            }
            let want = (order.len - offset).min(FETCH_BLOCK as u64) as u32;
            let data = fetch(&peer, piece, offset, want).await;
            if let Some(task) = writing.take() {
                writer = Some(task.await.map_err(task_err)?.map_err(store_err)?);
            }
            let data = data.map_err(|e| match e {
                FetchError::Rpc(source) => CopyError::Fetch {
                    piece,
                    node: node.clone(),
                    source,
                },
                FetchError::Timeout => CopyError::Timeout {
                    piece,
                    node: node.clone(),
                    offset,
                    timeout: REQUEST_TIMEOUT,
                },
            })?;
            let n = data.len() as u64;
            if offset + n > order.len {
                return Err(CopyError::WrongLength {
                    piece,
                    node,
                    got: offset + n,
                    expected: order.len,
                });
            }
            if n == 0 {
                break;
            }
            let at = offset;
            let mut writer = writer.take().expect("no write in flight");
            writing = Some(spawn_blocking(move || {
                writer.write_at(at, &data)?;
                Ok(writer)
            }));
            offset += n;
            if n < want as u64 {
                // The source piece ended.
                break;
            }
        }
        if let Some(task) = writing.take() {
            writer = Some(task.await.map_err(task_err)?.map_err(store_err)?);
        }
        let writer = writer.expect("no write in flight");
        if offset != order.len {
            return Err(CopyError::WrongLength {
                piece,
                node,
                got: offset,
                expected: order.len,
            });
        }
        let len = spawn_blocking(move || writer.commit())
            .await
            .map_err(task_err)?
            .map_err(store_err)?;
        Ok(len)
    }
}

enum FetchError {
    Rpc(RpcError),
    Timeout,
}

/// One ReadPiece exchange: up to `len` bytes of `piece` at `offset` (fewer if it ends first),
/// the whole exchange within [`REQUEST_TIMEOUT`].
async fn fetch(peer: &Peer, piece: PieceId, offset: u64, len: u32) -> Result<Vec<u8>, FetchError> {
    let exchange = async {
        let mut out = Vec::with_capacity(len as usize);
        peer.read_piece(piece, offset, len, &mut out, REQUEST_TIMEOUT).await?;
        Ok(out)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(r) => r.map_err(FetchError::Rpc),
        Err(_) => Err(FetchError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfs_proto::certs;
    use dfs_proto::tls::{TlsFiles, TlsIdentity};
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    fn identity(dir: &Path, ca: &certs::PemPair, name: &str) -> TlsIdentity {
        certs::write_pair(dir, name, &certs::issue(ca, name, &[]).unwrap()).unwrap();
        TlsIdentity::load(&TlsFiles {
            ca_cert: dir.join("ca.crt"),
            cert: certs::cert_path(dir, name),
            key: certs::key_path(dir, name),
        })
        .unwrap()
    }

    fn node(id: dfs_proto::types::NodeId, name: &str, addr: std::net::SocketAddr) -> NodeAddr {
        NodeAddr {
            id,
            name: name.into(),
            addr: addr.to_string(),
            up: true,
        }
    }

    async fn outcomes(copier: &Copier, n: usize) -> Vec<CopyDone> {
        let mut done = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while done.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "copies did not finish: {done:?}"
            );
            done.extend(copier.take_done());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done.sort_by_key(|d| d.piece);
        done
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_from_another_daemon_failing_over_and_reporting() {
        let certs_dir = tempfile::tempdir().unwrap();
        let ca = certs::generate_ca("test CA").unwrap();
        std::fs::write(certs_dir.path().join("ca.crt"), &ca.cert_pem).unwrap();
        let tls_a = identity(certs_dir.path(), &ca, "storage-1");
        let tls_b = identity(certs_dir.path(), &ca, "storage-2");

        // Daemon A serves the pieces.
        let dir_a = tempfile::tempdir().unwrap();
        let store_a = Arc::new(PieceStore::open(dir_a.path(), 36, 0).unwrap());
        let big: Vec<u8> = (0..(9 << 20) + 12345u32).map(|i| (i % 253) as u8).collect();
        for (piece, data) in [(5u64, &big[..]), (6, &big[..100_000]), (7, b"small".as_slice())] {
            let mut w = store_a.begin_write(piece, None).unwrap();
            w.write_at(0, data).unwrap();
            w.commit().unwrap();
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(store_a.layout().piece_path(6))
            .unwrap();
        f.write_all_at(b"X", 70_000).unwrap();
        let endpoint_a = dfs_proto::endpoint::server(
            "127.0.0.1:0".parse().unwrap(),
            tls_a.server_config().unwrap(),
            None,
            &tls_a.reset_secret(),
        )
        .unwrap();
        let addr_a = endpoint_a.local_addr().unwrap();
        tokio::spawn(crate::server::serve(
            endpoint_a.clone(),
            store_a.clone(),
            Default::default(),
        ));

        // Daemon B copies.
        let dir_b = tempfile::tempdir().unwrap();
        let store_b = Arc::new(PieceStore::open(dir_b.path(), 36, 0).unwrap());
        let endpoint_b = dfs_proto::endpoint::client(tls_b.client_config().unwrap()).unwrap();
        let copier = Copier::new(store_b.clone(), endpoint_b);
        let a = node(1, "storage-1", addr_a);
        // Same address, wrong certificate name: the TLS handshake fails at once.
        let impostor = node(3, "storage-9", addr_a);
        let order = |piece, len, sources: &[&NodeAddr]| CopyOrder {
            piece,
            len,
            sources: sources.iter().map(|n| (*n).clone()).collect(),
        };
        copier.submit(vec![
            order(5, big.len() as u64, &[&impostor, &a]),
            order(5, big.len() as u64, &[&a]), // a duplicate of one under way
            order(6, 100_000, &[&a]),
            order(7, 4, &[&a]), // the source holds 5 bytes: a truncated chunk
            order(8, 10, &[&a]),
        ]);
        let done = outcomes(&copier, 4).await;
        assert_eq!(
            done[0],
            CopyDone {
                piece: 5,
                outcome: Ok(big.len() as u64)
            }
        );
        // Only the chunk's bytes are copied, not what a truncate left past them.
        assert_eq!(
            done[2],
            CopyDone {
                piece: 7,
                outcome: Ok(4)
            }
        );
        let mut buf = vec![0u8; big.len()];
        assert_eq!(store_b.read(7, 0, &mut buf).unwrap(), 4);
        assert_eq!(store_b.read(5, 0, &mut buf).unwrap(), big.len());
        assert!(buf == big, "copy differs");
        for (d, piece, words) in [
            (&done[1], 6, &["storage-1", "corrupt"][..]),
            (&done[3], 8, &["storage-1", "not found"]),
        ] {
            assert_eq!(d.piece, piece);
            let msg = d.outcome.as_ref().unwrap_err();
            for w in words {
                assert!(msg.contains(w), "{msg:?} lacks {w:?}");
            }
            assert!(matches!(
                store_b.read(piece, 0, &mut buf),
                Err(StoreError::NotFound { .. })
            ));
        }
        assert_eq!(
            store_a.take_corrupt(),
            vec![6],
            "the source reported what it could not serve"
        );
        assert_eq!(copier.in_progress(), 0);
        assert!(copier.take_done().is_empty());

        // Already here and intact: nothing fetched (no source could serve it anyway).
        copier.submit(vec![order(5, big.len() as u64, &[&impostor])]);
        assert_eq!(outcomes(&copier, 1).await[0].outcome, Ok(big.len() as u64));
        assert_eq!(store_b.usage().pieces, 2, "pieces 5 and 7");
        assert!(store_b.take_corrupt().is_empty());
    }
}
