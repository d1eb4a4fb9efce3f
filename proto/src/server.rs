//! Server-side helpers: read a request envelope from a stream, write a typed answer.

use std::future::Future;
use std::net::SocketAddr;

use quinn::{Endpoint, RecvStream, SendStream};
use serde::de::DeserializeOwned;

use crate::call::Call;
use crate::error::RemoteError;
use crate::frame::{self, FrameError};

/// A client that opens a stream but does not send its request within this long is dropped.
pub const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the request at the head of a stream.
pub async fn read_request<E: DeserializeOwned>(recv: &mut RecvStream) -> Result<Option<E>, FrameError> {
    frame::read_frame_or_end(recv).await
}

/// Reads the request at the head of a stream within [`REQUEST_READ_TIMEOUT`]. A request that
/// cannot be decoded is answered with an error (and logged); `None` means nothing to serve.
pub async fn next_request<E: DeserializeOwned>(
    send: &mut SendStream,
    recv: &mut RecvStream,
    remote: SocketAddr,
) -> Option<E> {
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request::<E>(recv)).await {
        Ok(Ok(request)) => request,
        Err(_) => None,
        Ok(Err(e)) => {
            tracing::warn!("bad request from {remote}: {e}");
            let error = RemoteError::new(crate::ErrorKind::InvalidArgument, e.to_string());
            let _ = reply_error(send, error).await;
            let _ = send.finish();
            None
        }
    }
}

/// Writes the answer to a request of type `C`.
pub async fn reply<C: Call>(send: &mut SendStream, result: Result<C::Reply, RemoteError>) -> Result<(), FrameError> {
    frame::write_frame(send, &result).await
}

/// Writes an error answer when the request could not even be decoded.
pub async fn reply_error(send: &mut SendStream, error: RemoteError) -> Result<(), FrameError> {
    frame::write_frame(send, &Result::<(), RemoteError>::Err(error)).await
}

/// Logs a connection that failed before it was established: a peer refused by TLS (no cluster
/// certificate, wrong name) is worth a warning; a peer that gave up or timed out is not.
pub fn log_handshake_failure(remote: std::net::SocketAddr, error: &quinn::ConnectionError) {
    // QUIC carries TLS alerts as transport error codes 0x100..=0x1ff.
    let is_tls_alert = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match error {
        quinn::ConnectionError::TransportError(e) if is_tls_alert(e.code) => {
            tracing::warn!("refused connection from {remote}: {error}")
        }
        quinn::ConnectionError::ConnectionClosed(c) if is_tls_alert(c.error_code) => {
            tracing::warn!("refused connection from {remote}: {error}")
        }
        _ => tracing::debug!("connection from {remote} ended during its handshake: {error}"),
    }
}

/// Accepts connections on `endpoint` for as long as it is open and runs `handle` for every
/// request stream of every connection, each on its own task.
pub async fn accept_streams<H, F>(endpoint: Endpoint, handle: H)
where
    H: Fn(SendStream, RecvStream, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    while let Some(incoming) = endpoint.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    log_handshake_failure(remote, &e);
                    return;
                }
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle(send, recv, remote));
            }
        });
    }
}
