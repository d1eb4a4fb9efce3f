//! Calling a peer: one lazily (re)established connection per peer, one bidirectional stream per
//! request, and a deadline on every wait.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::Mutex;

use crate::call::Call;
use crate::error::{ErrorKind, RemoteError};
use crate::frame::{self, FrameError};

/// Why a call to a peer failed. Every variant names the peer.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("{peer} did not answer {call} within {timeout:?}")]
    Timeout {
        peer: String,
        call: &'static str,
        timeout: Duration,
    },
    #[error("connection to {peer} failed during {call}: {reason}")]
    Transport {
        peer: String,
        call: &'static str,
        reason: String,
    },
    #[error("bad message from {peer} during {call}: {source}")]
    Frame {
        peer: String,
        call: &'static str,
        #[source]
        source: FrameError,
    },
    #[error("{peer}: {source}")]
    Remote {
        peer: String,
        #[source]
        source: RemoteError,
    },
}

impl RpcError {
    /// The remote error kind, if the peer answered with an error.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            RpcError::Remote { source, .. } => Some(source.kind),
            _ => None,
        }
    }

    /// True when the peer could not be reached or stopped answering (as opposed to refusing).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            RpcError::Unreachable { .. } | RpcError::Timeout { .. } | RpcError::Transport { .. }
        )
    }
}

/// One remote server, reached through a shared endpoint.
pub struct Peer {
    endpoint: Endpoint,
    addr: String,
    server_name: String,
    connect_timeout: Duration,
    conn: Mutex<Option<Connection>>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.server_name, self.addr)
    }
}

impl Peer {
    /// `server_name` is the name the peer's certificate must carry.
    pub fn new(
        endpoint: Endpoint,
        addr: impl Into<String>,
        server_name: impl Into<String>,
        connect_timeout: Duration,
    ) -> Self {
        Peer {
            endpoint,
            addr: addr.into(),
            server_name: server_name.into(),
            connect_timeout,
            conn: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn name(&self) -> &str {
        &self.server_name
    }

    fn unreachable(&self, reason: impl fmt::Display) -> RpcError {
        RpcError::Unreachable {
            peer: self.to_string(),
            reason: reason.to_string(),
        }
    }

    async fn resolve(&self) -> Result<SocketAddr, RpcError> {
        let mut addrs = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| self.unreachable(format!("cannot resolve address: {e}")))?;
        addrs
            .next()
            .ok_or_else(|| self.unreachable("address resolves to nothing"))
    }

    /// The live connection, connecting first if there is none.
    pub async fn connection(&self) -> Result<Connection, RpcError> {
        Ok(self.connection_and_age().await?.0)
    }

    /// The live connection, and whether it was made by this call (false: an existing one,
    /// which may turn out to be stale, e.g. to a daemon that restarted a moment ago).
    async fn connection_and_age(&self) -> Result<(Connection, bool), RpcError> {
        let mut guard = tokio::time::timeout(self.connect_timeout, self.conn.lock())
            .await
            .map_err(|_| self.unreachable("timed out waiting for another connection attempt"))?;
        if let Some(conn) = guard.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok((conn.clone(), false));
        }
        *guard = None;
        let addr = tokio::time::timeout(self.connect_timeout, self.resolve())
            .await
            .map_err(|_| self.unreachable("timed out resolving address"))??;
        let connecting = self
            .endpoint
            .connect(addr, &self.server_name)
            .map_err(|e| self.unreachable(e))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| self.unreachable(format!("no handshake within {:?}", self.connect_timeout)))?
            .map_err(|e| self.unreachable(e))?;
        *guard = Some(conn.clone());
        Ok((conn, true))
    }

    /// Drops the cached connection if it is `conn` (after a failure on it).
    pub async fn forget(&self, conn: &Connection) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
            *guard = None;
        }
    }

    /// Opens a fresh request stream.
    pub async fn open_stream(
        &self,
        call: &'static str,
        timeout: Duration,
    ) -> Result<(Connection, SendStream, RecvStream), RpcError> {
        let (conn, send, recv, _) = self.open_stream_and_age(call, timeout).await?;
        Ok((conn, send, recv))
    }

    /// [`Peer::open_stream`], also saying whether the connection is new.
    async fn open_stream_and_age(
        &self,
        call: &'static str,
        timeout: Duration,
    ) -> Result<(Connection, SendStream, RecvStream, bool), RpcError> {
        let (conn, fresh) = self.connection_and_age().await?;
        match tokio::time::timeout(timeout, conn.open_bi()).await {
            Ok(Ok((send, recv))) => Ok((conn, send, recv, fresh)),
            Ok(Err(e)) => {
                self.forget(&conn).await;
                Err(self.transport(call, e))
            }
            Err(_) => Err(RpcError::Timeout {
                peer: self.to_string(),
                call,
                timeout,
            }),
        }
    }

    pub fn transport(&self, call: &'static str, reason: impl fmt::Display) -> RpcError {
        RpcError::Transport {
            peer: self.to_string(),
            call,
            reason: reason.to_string(),
        }
    }

    pub fn frame_error(&self, call: &'static str, source: FrameError) -> RpcError {
        match source {
            FrameError::Io(e) => self.transport(call, e),
            FrameError::Truncated => self.transport(call, "stream closed early"),
            source => RpcError::Frame {
                peer: self.to_string(),
                call,
                source,
            },
        }
    }

    pub fn remote(&self, source: RemoteError) -> RpcError {
        RpcError::Remote {
            peer: self.to_string(),
            source,
        }
    }

    /// Sends one request and waits at most `timeout` for its answer.
    pub async fn call<C: Call>(&self, request: C, timeout: Duration) -> Result<C::Reply, RpcError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (conn, mut send, mut recv) = self.open_stream(C::NAME, timeout).await?;
        let exchange = async {
            frame::write_frame(&mut send, &request.into_envelope())
                .await
                .map_err(|e| self.frame_error(C::NAME, e))?;
            let _ = send.finish();
            let reply: Result<C::Reply, RemoteError> = frame::read_frame(&mut recv)
                .await
                .map_err(|e| self.frame_error(C::NAME, e))?;
            frame::finish_reading(&mut recv);
            reply.map_err(|e| self.remote(e))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Err(e)) => {
                if e.is_unavailable() {
                    self.forget(&conn).await;
                }
                Err(e)
            }
            Ok(ok) => ok,
            Err(_) => {
                // A peer that stops answering may be gone: reconnect next time.
                if conn.close_reason().is_some() {
                    self.forget(&conn).await;
                }
                Err(RpcError::Timeout {
                    peer: self.to_string(),
                    call: C::NAME,
                    timeout,
                })
            }
        }
    }
}

/// One [`Peer`] per storage daemon, shared by everything that talks to daemons through one
/// endpoint; a daemon that re-registered at another address gets a fresh peer.
pub struct PeerMap {
    endpoint: Endpoint,
    connect_timeout: Duration,
    peers: std::sync::Mutex<std::collections::HashMap<crate::types::NodeId, std::sync::Arc<Peer>>>,
}

impl PeerMap {
    pub fn new(endpoint: Endpoint, connect_timeout: Duration) -> Self {
        PeerMap {
            endpoint,
            connect_timeout,
            peers: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn get(&self, node: &crate::types::NodeAddr) -> std::sync::Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get(&node.id) {
            Some(p) if p.addr() == node.addr && p.name() == node.name => p.clone(),
            _ => {
                let p = std::sync::Arc::new(Peer::new(
                    self.endpoint.clone(),
                    node.addr.clone(),
                    node.name.clone(),
                    self.connect_timeout,
                ));
                peers.insert(node.id, p.clone());
                p
            }
        }
    }
}

impl Peer {
    /// Reads up to `len` bytes of `piece` at `offset` from this storage daemon, appending them
    /// to `out` straight from QUIC's buffers; returns how many the daemon holds there (fewer
    /// if the piece ends first). The caller bounds the whole exchange with its own deadline.
    pub async fn read_piece(
        &self,
        piece: crate::types::PieceId,
        offset: u64,
        len: u32,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<usize, RpcError> {
        let mark = out.len();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (result, reused) = self.read_piece_once(piece, offset, len, out, timeout).await;
            match result {
                // A connection kept from before may be to a daemon that restarted since (the
                // keep-alive finds out within a second): a read is safe to ask again, once.
                Err(e)
                    if reused
                        && attempts == 1
                        && matches!(e, RpcError::Transport { .. } | RpcError::Unreachable { .. }) =>
                {
                    tracing::debug!("{self}: read of piece {piece} on a stale connection ({e}); reconnecting");
                    out.truncate(mark);
                }
                other => return other,
            }
        }
    }

    /// One attempt of [`Peer::read_piece`]; also says whether it used an existing connection
    /// (which it then forgot if it failed).
    async fn read_piece_once(
        &self,
        piece: crate::types::PieceId,
        offset: u64,
        len: u32,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> (Result<usize, RpcError>, bool) {
        use crate::storage::{ReadPiece, ReadReply};
        const NAME: &str = ReadPiece::NAME;
        let (conn, mut send, mut recv, fresh) = match self.open_stream_and_age(NAME, timeout).await {
            Ok(opened) => opened,
            Err(e) => return (Err(e), false),
        };
        let result = async {
            let request = ReadPiece { piece, offset, len };
            frame::write_frame(&mut send, &request.into_envelope())
                .await
                .map_err(|e| self.frame_error(NAME, e))?;
            let _ = send.finish();
            let reply: Result<ReadReply, RemoteError> = frame::read_frame(&mut recv)
                .await
                .map_err(|e| self.frame_error(NAME, e))?;
            let n = reply.map_err(|e| self.remote(e))?.len;
            if n > len {
                return Err(self.transport(NAME, format!("sent {n} bytes for a {len}-byte read")));
            }
            let mut left = n as usize;
            while left > 0 {
                match recv.read_chunk(left, true).await {
                    Ok(Some(chunk)) => {
                        left -= chunk.bytes.len();
                        out.extend_from_slice(&chunk.bytes);
                    }
                    Ok(None) => {
                        let short = format!("read of piece {piece} cut short: {left} of {n} bytes missing");
                        return Err(self.transport(NAME, short));
                    }
                    Err(e) => return Err(self.transport(NAME, format!("read of piece {piece} cut short: {e}"))),
                }
            }
            frame::finish_reading(&mut recv);
            Ok(n as usize)
        }
        .await;
        if result.as_ref().is_err_and(|e| e.is_unavailable()) {
            self.forget(&conn).await;
        }
        (result, !fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Ping, StorageRequest};
    use crate::tls::{TlsFiles, TlsIdentity};

    fn identity(dir: &std::path::Path, ca: &crate::certs::PemPair, name: &str) -> TlsIdentity {
        let pair = crate::certs::issue(ca, name, &[]).unwrap();
        crate::certs::write_pair(dir, name, &pair).unwrap();
        TlsIdentity::load(&TlsFiles {
            ca_cert: crate::certs::cert_path(dir, "ca"),
            cert: crate::certs::cert_path(dir, name),
            key: crate::certs::key_path(dir, name),
        })
        .unwrap()
    }

    /// A request costs one datagram each way: before `frame::finish_reading`, both ends
    /// stopped every stream they dropped (a STOP_SENDING frame), which doubled the datagrams
    /// of every request (one more packet, and the acknowledgement it called for).
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_is_one_datagram_each_way() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::certs::generate_ca("test ca").unwrap();
        crate::certs::write_pair(dir.path(), "ca", &ca).unwrap();
        let server_id = identity(dir.path(), &ca, "server");
        let client_id = identity(dir.path(), &ca, "client");
        let server = crate::endpoint::server(
            "127.0.0.1:0".parse().unwrap(),
            server_id.server_config().unwrap(),
            None,
            &server_id.reset_secret(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(crate::server::accept_streams(
            server,
            |mut send, mut recv, remote| async move {
                if crate::server::next_request::<StorageRequest>(&mut send, &mut recv, remote)
                    .await
                    .is_some()
                {
                    let _ = crate::server::reply::<Ping>(&mut send, Ok(Default::default())).await;
                    let _ = send.finish();
                }
                crate::frame::finish_reading(&mut recv);
            },
        ));
        let client = crate::endpoint::client(client_id.client_config().unwrap()).unwrap();
        let peer = Peer::new(client, addr.to_string(), "server", Duration::from_secs(5));
        peer.call(Ping {}, Duration::from_secs(5)).await.unwrap();
        let conn = peer.connection().await.unwrap();
        let before = conn.stats();
        const CALLS: u64 = 100;
        for _ in 0..CALLS {
            peer.call(Ping {}, Duration::from_secs(5)).await.unwrap();
        }
        let after = conn.stats();
        assert_eq!(
            after.frame_tx.stop_sending, before.frame_tx.stop_sending,
            "the client stopped streams"
        );
        assert_eq!(
            after.frame_rx.stop_sending, before.frame_rx.stop_sending,
            "the server stopped streams"
        );
        let sent = after.udp_tx.datagrams - before.udp_tx.datagrams;
        let received = after.udp_rx.datagrams - before.udp_rx.datagrams;
        // A few acknowledgement-only packets and MTU probes on top of one per request.
        assert!(sent <= CALLS + CALLS / 5, "{sent} datagrams sent for {CALLS} requests");
        assert!(
            received <= CALLS + CALLS / 5,
            "{received} datagrams received for {CALLS} requests"
        );
    }
}
