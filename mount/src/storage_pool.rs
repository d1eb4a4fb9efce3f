//! Connections to storage daemons (one QUIC connection per daemon, a stream per request), and
//! the two data operations: read a byte range of a piece, stream a new piece.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dfs_proto::frame;
use dfs_proto::meta::BasePiece;
use dfs_proto::storage::{BaseOpened, PieceWritten, SegmentHeader, WritePiece};
use dfs_proto::types::{NodeAddr, NodeId, PieceId};
use dfs_proto::{Call, Peer, PeerMap, RemoteError, RpcError};
use quinn::{Endpoint, RecvStream, SendStream};

use crate::error::{FsError, FsResult};

/// A daemon this mount failed to reach is tried last (and avoided for new data) this long.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

pub struct StoragePool {
    peers: PeerMap,
    suspects: Mutex<HashMap<NodeId, Instant>>,
}

impl StoragePool {
    pub fn new(endpoint: Endpoint, connect_timeout: Duration) -> Self {
        StoragePool {
            peers: PeerMap::new(endpoint, connect_timeout),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that `node` just failed a request.
    pub fn suspect(&self, node: NodeId) {
        self.suspects
            .lock()
            .expect("suspects")
            .insert(node, Instant::now() + SUSPECT_FOR);
    }

    /// Daemons that failed a request recently.
    pub fn suspects(&self) -> Vec<NodeId> {
        let now = Instant::now();
        let mut s = self.suspects.lock().expect("suspects");
        s.retain(|_, until| *until > now);
        s.keys().copied().collect()
    }

    pub fn peer(&self, node: &NodeAddr) -> Arc<Peer> {
        self.peers.get(node)
    }

    /// Appends to `out` up to `len` bytes of `piece` at `offset` from `node`; returns how many
    /// it holds there (fewer if the piece ends first).
    pub async fn read_into(
        &self,
        node: &NodeAddr,
        piece: PieceId,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> FsResult<usize> {
        let peer = self.peer(node);
        let exchange = async {
            peer.read_piece(piece, offset, len as u32, out, timeout)
                .await
                .map_err(|e| FsError::from(e).with_context(format!("reading piece {piece}")))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(FsError::io(format!(
                "storage daemon {} did not answer a read of piece {piece} within {timeout:?}",
                peer
            ))),
        }
    }

    /// Opens a stream that will carry a new piece to `node`.
    pub async fn start_piece(
        &self,
        node: &NodeAddr,
        piece: PieceId,
        base: Option<BasePiece>,
        timeout: Duration,
    ) -> Result<PieceStream, RpcError> {
        let peer = self.peer(node);
        let (_conn, mut send, recv) = peer.open_stream(WritePiece::NAME, timeout).await?;
        let header = WritePiece { piece, base };
        match tokio::time::timeout(timeout, frame::write_frame(&mut send, &header.into_envelope())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(peer.frame_error(WritePiece::NAME, e)),
            Err(_) => {
                return Err(RpcError::Timeout {
                    peer: peer.to_string(),
                    call: WritePiece::NAME,
                    timeout,
                });
            }
        }
        let mut recv = recv;
        if let Some(base) = base {
            // The daemon answers once it holds the base open (or why it cannot): a base deleted
            // since the allocation is found now, while the write can still be placed again.
            let opened = tokio::time::timeout(
                timeout,
                frame::read_frame::<_, Result<BaseOpened, RemoteError>>(&mut recv),
            )
            .await;
            match opened {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => return Err(peer.remote(e)),
                Ok(Err(e)) => return Err(peer.frame_error(WritePiece::NAME, e)),
                Err(_) => {
                    tracing::debug!("piece {piece}: base {} not confirmed open in time", base.piece);
                    return Err(RpcError::Timeout {
                        peer: peer.to_string(),
                        call: WritePiece::NAME,
                        timeout,
                    });
                }
            }
        }
        Ok(PieceStream {
            peer,
            piece,
            send,
            recv,
        })
    }
}

impl FsError {
    fn with_context(mut self, what: String) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// A piece being streamed to its daemon: segments, then `finish` for the durable acknowledgement.
pub struct PieceStream {
    peer: Arc<Peer>,
    piece: PieceId,
    send: SendStream,
    recv: RecvStream,
}

impl PieceStream {
    pub async fn send_segment(&mut self, offset: u64, data: Bytes, timeout: Duration) -> FsResult<()> {
        let header = SegmentHeader {
            offset,
            len: data.len() as u32,
        };
        let piece = self.piece;
        let io = async {
            self.send.write_all(&header.encode()).await?;
            self.send.write_chunk(data).await
        };
        match tokio::time::timeout(timeout, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(FsError::io(format!(
                "storage daemon {}: writing piece {piece} failed: {e}",
                self.peer
            ))),
            Err(_) => Err(FsError::io(format!(
                "storage daemon {} accepted no data for piece {piece} within {timeout:?}",
                self.peer
            ))),
        }
    }

    /// Ends the piece and waits until the daemon reports it durable; returns its length.
    pub async fn finish(mut self, timeout: Duration) -> FsResult<u64> {
        let piece = self.piece;
        let _ = self.send.finish();
        let reply = tokio::time::timeout(
            timeout,
            frame::read_frame::<_, Result<PieceWritten, RemoteError>>(&mut self.recv),
        )
        .await;
        frame::finish_reading(&mut self.recv);
        match reply {
            Ok(Ok(Ok(w))) => Ok(w.len),
            Ok(Ok(Err(e))) => Err(FsError::from(self.peer.remote(e)).with_context(format!("storing piece {piece}"))),
            Ok(Err(e)) => Err(FsError::from(self.peer.frame_error(WritePiece::NAME, e))
                .with_context(format!("storing piece {piece}"))),
            Err(_) => Err(FsError::io(format!(
                "storage daemon {} did not confirm piece {piece} durable within {timeout:?}",
                self.peer
            ))),
        }
    }
}
