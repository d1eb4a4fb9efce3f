//! Length-prefixed postcard frames: `[u32 big-endian length][postcard bytes]`.
//!
//! The length is checked against a bound before anything is allocated, and decoding never
//! panics: a hostile or broken peer costs at most one bounded buffer and gets an error.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted or sent. Messages are small; file bytes never travel in frames.
pub const MAX_FRAME: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended before a complete frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge { len: usize },
    #[error("undecodable frame: {0}")]
    Decode(#[source] postcard::Error),
    #[error("cannot encode frame: {0}")]
    Encode(#[source] postcard::Error),
    #[error("stream I/O failed: {0}")]
    Io(#[source] std::io::Error),
}

fn io_error(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

/// Serializes `msg` into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    let mut buf = postcard::to_extend(msg, std::mem::take(&mut buf)).map_err(FrameError::Encode)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = encode(msg)?;
    w.write_all(&buf).await.map_err(io_error)
}

/// Takes note of the end of a stream whose last frame was just read, if that end is already
/// here (it usually comes in the same packet). A stream dropped before its end was read is
/// *stopped*: a STOP_SENDING frame, an ack-eliciting packet of its own, and on the peer an
/// immediate acknowledgement; measured, that doubled the datagrams of every request. If the
/// end is not here yet, or data follows, nothing is waited for and the drop stops the stream
/// as before.
pub fn finish_reading(recv: &mut quinn::RecvStream) {
    use std::future::Future;
    let mut probe = [0u8; 1];
    let mut read = std::pin::pin!(recv.read(&mut probe));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = read.as_mut().poll(&mut cx);
}

/// Reads one frame; `Ok(None)` if the stream ended cleanly before its first byte.
pub async fn read_frame_or_end<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await.map_err(io_error)?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(io_error)?;
    postcard::from_bytes(&body).map(Some).map_err(FrameError::Decode)
}

pub async fn read_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_or_end(r).await?.ok_or(FrameError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Msg {
        a: u64,
        name: Vec<u8>,
    }

    #[tokio::test]
    async fn round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let m = Msg {
            a: 7,
            name: b"hello".to_vec(),
        };
        write_frame(&mut a, &m).await.unwrap();
        drop(a);
        let got: Msg = read_frame(&mut b).await.unwrap();
        assert_eq!(got, m);
        let end: Option<Msg> = read_frame_or_end(&mut b).await.unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame::<_, Msg>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors_not_panics() {
        for body in [vec![0xff; 9], vec![], vec![1]] {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
            a.write_all(&body).await.unwrap();
            drop(a);
            assert!(read_frame::<_, Msg>(&mut b).await.is_err());
        }
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        assert!(matches!(read_frame::<_, Msg>(&mut b).await, Err(FrameError::Truncated)));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&100u32.to_be_bytes()).await.unwrap();
        a.write_all(&[1, 2, 3]).await.unwrap();
        drop(a);
        assert!(matches!(read_frame::<_, Msg>(&mut b).await, Err(FrameError::Truncated)));
    }
}
