//! `dfs locate PATH...`: which storage daemons hold a file's chunks.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dfs_common::Config;
use dfs_proto::meta::{CHUNK_WINDOW, ChunkLocation, ChunkMap};
use dfs_proto::tls::TlsIdentity;
use dfs_proto::{Peer, RpcError};
use serde::Serialize;

use crate::status::StatusError;

#[derive(Debug, Serialize)]
pub struct Located {
    pub path: PathBuf,
    pub ino: u64,
    pub size: u64,
    pub chunks: Vec<ChunkLocation>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(transparent)]
    Setup(#[from] StatusError),
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Rpc {
        path: PathBuf,
        #[source]
        source: RpcError,
    },
}

pub async fn locate(config: &Config, paths: &[PathBuf], timeout: Duration) -> Result<Vec<Located>, LocateError> {
    let client = config.client().map_err(StatusError::from)?;
    let tls = TlsIdentity::load(&config.tls_files(&client.cert, &client.key)).map_err(StatusError::from)?;
    let endpoint =
        dfs_proto::endpoint::client(tls.client_config().map_err(StatusError::from)?).map_err(StatusError::from)?;
    let peer = Peer::new(
        endpoint.clone(),
        config.cluster.metaserver.clone(),
        config.cluster.metaserver_name.clone(),
        timeout,
    );
    let mut out = Vec::new();
    for path in paths {
        out.push(locate_one(&peer, path, timeout).await?);
    }
    endpoint.close(0u32.into(), b"done");
    Ok(out)
}

async fn locate_one(peer: &Peer, path: &Path, timeout: Duration) -> Result<Located, LocateError> {
    let meta = std::fs::metadata(path).map_err(|source| LocateError::Stat {
        path: path.to_owned(),
        source,
    })?;
    let ino = meta.ino();
    let rpc = |source| LocateError::Rpc {
        path: path.to_owned(),
        source,
    };
    let mut chunks = Vec::new();
    let mut first = 0u64;
    loop {
        let reply = peer
            .call(
                ChunkMap {
                    ino,
                    first,
                    count: CHUNK_WINDOW,
                },
                timeout,
            )
            .await
            .map_err(rpc)?;
        chunks.extend(reply.chunks);
        first += CHUNK_WINDOW as u64;
        if first * reply.chunk_size >= reply.attr.size {
            return Ok(Located {
                path: path.to_owned(),
                ino,
                size: reply.attr.size,
                chunks,
            });
        }
    }
}

pub fn render(located: &[Located]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for l in located {
        let _ = writeln!(
            out,
            "{}: inode {}, {} bytes, {} stored chunks",
            l.path.display(),
            l.ino,
            l.size,
            l.chunks.len()
        );
        for c in &l.chunks {
            let holders: Vec<String> = c
                .nodes
                .iter()
                .map(|n| format!("{} ({}){}", n.name, n.addr, if n.up { "" } else { " DOWN" }))
                .collect();
            let _ = writeln!(
                out,
                "  chunk {:>6}  piece {:>10}  {:>10} bytes  on {}",
                c.chunk,
                c.piece,
                c.len,
                holders.join(", ")
            );
        }
    }
    out
}
