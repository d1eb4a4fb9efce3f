//! The one place that defines how dfs components talk: message types (serde + postcard),
//! length-prefixed framing, mutual TLS with the cluster CA, and QUIC endpoints.

pub mod call;
pub mod certs;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod locks;
pub mod meta;
pub mod names;
pub mod rpc;
pub mod server;
pub mod storage;
pub mod tls;
pub mod types;

pub use call::Call;
pub use error::{ErrorKind, RemoteError};
pub use rpc::{Peer, PeerMap, RpcError};
pub use types::*;
