//! Server-side helpers: read a request envelope from a stream, write a typed answer.

use quinn::{RecvStream, SendStream};
use serde::de::DeserializeOwned;

use crate::call::Call;
use crate::error::RemoteError;
use crate::frame::{self, FrameError};

/// Reads the request at the head of a stream.
pub async fn read_request<E: DeserializeOwned>(recv: &mut RecvStream) -> Result<Option<E>, FrameError> {
    frame::read_frame_or_end(recv).await
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
