//! Serves piece reads and writes to clients over QUIC. Bytes are streamed in bounded segments;
//! disk work runs on the blocking pool, overlapped with receiving the next segment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dfs_proto::frame;
use dfs_proto::server::{next_request, reply};
use dfs_proto::storage::Ping;
use dfs_proto::storage::{
    BaseOpened, MAX_READ, PieceWritten, ReadPiece, ReadReply, SegmentHeader, StorageRequest, WritePiece,
};
use dfs_proto::types::PieceId;
use dfs_proto::{ErrorKind, RemoteError};
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, spawn_blocking};

use crate::metrics::StorageMetrics;
use crate::store::{PieceReader, PieceStore, PieceWriter, StoreError};

/// A client that stops sending mid-piece for this long is abandoned (its partial piece
/// discarded). Mounts end streams after 10 s without writes, far sooner.
const SEGMENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Reads are sent in pieces of this size.
const READ_BLOCK: usize = 1 << 20;
/// Stream error code telling a reader the data after the header is not coming.
const READ_FAILED: VarInt = VarInt::from_u32(1);
/// A read of a piece still being received waits this long for it to be stored.
const RECEIVING_WAIT: Duration = Duration::from_secs(5);

/// Pieces being received. A mount commits a new piece while its daemons make it durable
/// (`CommitWrite::pieces_in_flight`), so another mount may ask for it a moment before it is
/// stored: such a read waits for it instead of finding it missing.
#[derive(Default)]
pub struct Receiving(Mutex<HashMap<PieceId, Arc<Notify>>>);

/// Marks a piece as being received until dropped (stored, failed or abandoned).
struct ReceivingGuard<'a> {
    set: &'a Receiving,
    piece: PieceId,
    done: Arc<Notify>,
}

impl Receiving {
    fn start(&self, piece: PieceId) -> ReceivingGuard<'_> {
        let done = Arc::new(Notify::new());
        self.0.lock().expect("receiving").insert(piece, done.clone());
        ReceivingGuard { set: self, piece, done }
    }

    /// Waits (at most `limit`) until `piece` is no longer being received; false if it was not.
    async fn wait(&self, piece: PieceId, limit: Duration) -> bool {
        let Some(done) = self.0.lock().expect("receiving").get(&piece).cloned() else {
            return false;
        };
        let notified = done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Ended between the lookup and `enable`: its wake-up was before we listened.
        if !self.0.lock().expect("receiving").contains_key(&piece) {
            return true;
        }
        let _ = tokio::time::timeout(limit, notified).await;
        true
    }
}

impl Drop for ReceivingGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.set.0.lock().expect("receiving");
        if map.get(&self.piece).is_some_and(|d| Arc::ptr_eq(d, &self.done)) {
            map.remove(&self.piece);
        }
        drop(map);
        self.done.notify_waiters();
    }
}

pub async fn serve(endpoint: Endpoint, store: Arc<PieceStore>, metrics: StorageMetrics) {
    let receiving = Arc::new(Receiving::default());
    dfs_proto::server::accept_streams(endpoint, move |send, recv, remote| {
        handle_stream(store.clone(), receiving.clone(), metrics.clone(), send, recv, remote)
    })
    .await
}

async fn handle_stream(
    store: Arc<PieceStore>,
    receiving: Arc<Receiving>,
    metrics: StorageMetrics,
    mut send: SendStream,
    mut recv: RecvStream,
    remote: SocketAddr,
) {
    let Some(request) = next_request::<StorageRequest>(&mut send, &mut recv, remote).await else {
        return;
    };
    let started = std::time::Instant::now();
    let call = request.name();
    let timer = metrics.requests.start(call);
    let kind = |e: &RemoteError| Some(format!("{:?}", e.kind));
    let sent = match request {
        StorageRequest::WritePiece(w) => {
            let piece = w.piece;
            let guard = receiving.start(piece);
            let result = receive_piece(store, w, &mut send, &mut recv, &metrics).await;
            drop(guard);
            if let Err(e) = &result {
                tracing::warn!("write of piece {piece} from {remote} failed: {}", e.message);
            }
            timer.done(result.as_ref().err().and_then(kind));
            reply::<WritePiece>(&mut send, result).await
        }
        StorageRequest::ReadPiece(r) => {
            let result = send_range(store, &receiving, r, &mut send, remote).await;
            if let Ok(sent) = &result {
                metrics.bytes_read.inc_by(*sent);
            }
            timer.done(result.as_ref().err().and_then(kind));
            Ok(())
        }
        StorageRequest::Ping(_) => {
            timer.done(None);
            reply::<Ping>(&mut send, Ok(store.usage())).await
        }
    };
    if sent.is_ok() {
        let _ = send.finish();
    }
    dfs_proto::frame::finish_reading(&mut recv);
    tracing::debug!("{call} from {remote} answered in {:?}", started.elapsed());
}

fn join_error(e: tokio::task::JoinError) -> RemoteError {
    RemoteError::new(ErrorKind::Io, format!("storage task failed: {e}"))
}

fn store_error(e: StoreError) -> RemoteError {
    e.to_remote()
}

fn protocol_error(piece: u64, what: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(ErrorKind::InvalidArgument, format!("piece {piece}: {what}"))
}

/// Reads exactly `buf.len()` bytes, or returns false on a clean end of stream before any byte.
async fn read_header(
    recv: &mut RecvStream,
    buf: &mut [u8; SegmentHeader::SIZE],
    piece: u64,
) -> Result<bool, RemoteError> {
    let mut got = 0;
    while got < buf.len() {
        match tokio::time::timeout(SEGMENT_TIMEOUT, recv.read(&mut buf[got..])).await {
            Err(_) => return Err(protocol_error(piece, "client stopped sending")),
            Ok(Err(e)) => return Err(protocol_error(piece, format!("stream failed: {e}"))),
            Ok(Ok(None)) if got == 0 => return Ok(false),
            Ok(Ok(None)) => return Err(protocol_error(piece, "stream ended inside a segment header")),
            Ok(Ok(Some(n))) => got += n,
        }
    }
    Ok(true)
}

/// A piece up to this size is gathered in memory and written, made durable and put into place
/// in one step once the stream ends (small files: one trip to the blocking pool, not three).
const GATHER_LIMIT: usize = 256 << 10;

async fn receive_piece(
    store: Arc<PieceStore>,
    req: WritePiece,
    send: &mut SendStream,
    recv: &mut RecvStream,
    metrics: &StorageMetrics,
) -> Result<PieceWritten, RemoteError> {
    let piece = req.piece;
    // The base is opened before any data is taken: from here on its bytes are this write's,
    // even if the base is deleted before the stream ends.
    let mut base = match req.base {
        Some(b) => {
            let s = store.clone();
            let opened = spawn_blocking(move || s.open_base(b))
                .await
                .map_err(join_error)?
                .map_err(|e| {
                    if matches!(e, StoreError::NotFound { .. }) {
                        store.note_missing(b.piece);
                    }
                    RemoteError::new(e.to_remote().kind, format!("base of piece {piece}: {e}"))
                })?;
            let ready: Result<BaseOpened, RemoteError> = Ok(BaseOpened { len: opened.len() });
            match tokio::time::timeout(SEGMENT_TIMEOUT, frame::write_frame(send, &ready)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(protocol_error(piece, format!("cannot answer: {e}"))),
                Err(_) => return Err(protocol_error(piece, "client stopped reading")),
            }
            Some(opened)
        }
        None => None,
    };
    let mut gathered: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut gathered_bytes = 0usize;
    // Once streaming, the writer travels through the blocking pool: the task writing the last
    // segment hands it back.
    let mut busy: Option<JoinHandle<Result<PieceWriter, StoreError>>> = None;
    let mut streaming = false;
    let mut header = [0u8; SegmentHeader::SIZE];
    while read_header(recv, &mut header, piece).await? {
        let seg = SegmentHeader::decode(&header).map_err(|e| protocol_error(piece, e))?;
        let mut data = vec![0u8; seg.len as usize];
        match tokio::time::timeout(SEGMENT_TIMEOUT, recv.read_exact(&mut data)).await {
            Err(_) => return Err(protocol_error(piece, "client stopped sending")),
            Ok(Err(e)) => return Err(protocol_error(piece, format!("segment truncated: {e}"))),
            Ok(Ok(())) => {}
        }
        if !streaming {
            gathered_bytes += data.len();
            gathered.push((seg.offset, data));
            if gathered_bytes <= GATHER_LIMIT {
                continue;
            }
            // Too big to gather: start the piece with what came so far, then stream the rest.
            streaming = true;
            let (s, base, pending) = (store.clone(), base.take(), std::mem::take(&mut gathered));
            busy = Some(spawn_blocking(move || {
                let mut writer = s.begin_write_from(piece, base)?;
                for (offset, data) in pending {
                    writer.write_at(offset, &data)?;
                }
                Ok(writer)
            }));
            continue;
        }
        // Wait for the previous disk write only now, so the network read overlapped it.
        let mut writer = settle(busy.take()).await?;
        busy = Some(spawn_blocking(move || {
            writer.write_at(seg.offset, &data)?;
            Ok(writer)
        }));
    }
    let stream_ended = std::time::Instant::now();
    let len = if streaming {
        let writer = settle(busy.take()).await?;
        spawn_blocking(move || writer.commit()).await
    } else {
        spawn_blocking(move || {
            let mut writer = store.begin_write_from(piece, base)?;
            for (offset, data) in gathered {
                writer.write_at(offset, &data)?;
            }
            writer.commit()
        })
        .await
    };
    let len = len.map_err(join_error)?.map_err(store_error)?;
    metrics.piece_durable.observe(stream_ended.elapsed().as_secs_f64());
    metrics.bytes_written.inc_by(len);
    Ok(PieceWritten { len })
}

async fn settle(task: Option<JoinHandle<Result<PieceWriter, StoreError>>>) -> Result<PieceWriter, RemoteError> {
    task.expect("a streaming piece always has a writer in flight")
        .await
        .map_err(join_error)?
        .map_err(store_error)
}

/// Serves a read; returns the bytes sent, or the error the reader was given.
async fn send_range(
    store: Arc<PieceStore>,
    receiving: &Receiving,
    req: ReadPiece,
    send: &mut SendStream,
    remote: SocketAddr,
) -> Result<u64, RemoteError> {
    let piece = req.piece;
    if req.len > MAX_READ {
        let e = protocol_error(
            piece,
            format!("read of {} bytes exceeds the {MAX_READ}-byte limit", req.len),
        );
        let _ = reply::<ReadPiece>(send, Err(e.clone())).await;
        return Err(e);
    }
    // Opening and the first block in one trip to the blocking pool: most reads are one block.
    // It is read and verified before answering, so a damaged range is answered with a
    // Corrupt error in the common case (reads of up to READ_BLOCK bytes); damage found
    // further on cuts the stream short.
    let (start, want) = (req.offset, req.len as u64);
    let open = || {
        let s = store.clone();
        spawn_blocking(move || {
            let reader = s.open_reader(piece)?;
            let available = reader.len().saturating_sub(start).min(want);
            let mut buf = vec![0u8; (available as usize).min(READ_BLOCK)];
            let first = reader.read_exact(start, &mut buf).map(|()| buf).map_err(store_error);
            Ok::<_, StoreError>((Arc::new(reader), available, first))
        })
    };
    let mut opened = open().await;
    if matches!(opened, Ok(Err(StoreError::NotFound { .. }))) && receiving.wait(piece, RECEIVING_WAIT).await {
        opened = open().await;
    }
    let (reader, available, first) = match opened {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            if matches!(e, StoreError::NotFound { .. }) {
                store.note_missing(piece);
            } else {
                tracing::warn!("read of piece {piece} for {remote} failed: {e}");
            }
            let e = e.to_remote();
            let _ = reply::<ReadPiece>(send, Err(e.clone())).await;
            return Err(e);
        }
        Err(e) => {
            let e = join_error(e);
            let _ = reply::<ReadPiece>(send, Err(e.clone())).await;
            return Err(e);
        }
    };
    let mut offset = req.offset;
    let end = req.offset + available;
    let first = match first {
        Ok(buf) => buf,
        Err(e) => {
            tracing::warn!("read of piece {piece} for {remote} failed: {}", e.message);
            let _ = reply::<ReadPiece>(send, Err(e.clone())).await;
            return Err(e);
        }
    };
    if reply::<ReadPiece>(send, Ok(ReadReply { len: available as u32 }))
        .await
        .is_err()
    {
        return Ok(0);
    }
    let mut next = Some(Ok(first));
    while offset < end {
        let block = match next.take() {
            Some(b) => b,
            None => read_verified(reader.clone(), offset, end).await,
        };
        match block {
            Ok(buf) => {
                offset += buf.len() as u64;
                // Handing quinn the buffer itself spares a copy of every byte served.
                if send.write_chunk(bytes::Bytes::from(buf)).await.is_err() {
                    return Ok(offset - req.offset);
                }
            }
            Err(e) => {
                tracing::error!("read of piece {piece} at {offset} for {remote} failed: {}", e.message);
                let _ = send.reset(READ_FAILED);
                return Err(e);
            }
        }
    }
    Ok(offset - req.offset)
}

/// Reads (and verifies) the next at most READ_BLOCK bytes of `[offset, end)`.
async fn read_verified(reader: Arc<PieceReader>, offset: u64, end: u64) -> Result<Vec<u8>, RemoteError> {
    let n = ((end - offset) as usize).min(READ_BLOCK);
    spawn_blocking(move || {
        let mut buf = vec![0u8; n];
        reader.read_exact(offset, &mut buf).map(|()| buf)
    })
    .await
    .map_err(join_error)?
    .map_err(store_error)
}
