//! QUIC endpoints with the socket buffers and transport limits every dfs process uses.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, EndpointConfig, MtuDiscoveryConfig, TokioRuntime, TransportConfig, VarInt};
use quinn_proto::HashedConnectionIdGenerator;
use socket2::{Domain, Protocol, Socket, Type};

/// UDP socket buffer size. With the kernel default (~208 KiB) quinn drops thousands of packets
/// per GiB even on loopback.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;
/// A connection with no packets for this long is dead (keep-alives flow far more often).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start QUIC endpoint on {addr}: {source}")]
    Start {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_bidi_streams(VarInt::from_u32(4096));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    let mut mtu = MtuDiscoveryConfig::default();
    // Loopback and jumbo-frame LANs carry far larger datagrams; discovery backs off elsewhere.
    mtu.upper_bound(8952);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Sets a socket buffer, forcing past `net.core.{r,w}mem_max` when privileged.
fn set_buffer(socket: &Socket, force_opt: libc::c_int, set: impl Fn(&Socket) -> std::io::Result<()>) {
    let size = UDP_BUFFER_BYTES as libc::c_int;
    // SAFETY: plain setsockopt on an owned fd with a correctly sized int argument.
    let forced = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            force_opt,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = set(socket);
    }
}

/// Binds a UDP socket with large buffers (warns if the kernel caps them).
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, EndpointError> {
    let bind_err = |source| EndpointError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind_err)?;
    if addr.is_ipv6() {
        // Dual stack: an IPv6 socket also reaches IPv4 peers (as mapped addresses).
        socket.set_only_v6(false).map_err(bind_err)?;
    }
    set_buffer(&socket, libc::SO_RCVBUFFORCE, |s| {
        s.set_recv_buffer_size(UDP_BUFFER_BYTES)
    });
    set_buffer(&socket, libc::SO_SNDBUFFORCE, |s| {
        s.set_send_buffer_size(UDP_BUFFER_BYTES)
    });
    if let Ok(got) = socket.recv_buffer_size()
        && got < UDP_BUFFER_BYTES
    {
        tracing::warn!(
            "UDP receive buffer on {addr} is {got} bytes (wanted {UDP_BUFFER_BYTES}); \
                 raise net.core.rmem_max to avoid packet loss"
        );
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

/// A server endpoint that can also open client connections (with `client`). `reset_secret` must
/// be stable across restarts (see `TlsIdentity::reset_secret`): it keys both the stateless
/// reset tokens and the connection ids this endpoint hands out. A restarted server must
/// recognise the ids its previous run issued as its own, or it drops its old peers' packets as
/// noise ("invalid CID") instead of resetting their connections, and they wait out a timeout.
pub fn server(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    client: Option<quinn::ClientConfig>,
    reset_secret: &[u8; 32],
) -> Result<Endpoint, EndpointError> {
    let socket = bind_udp(addr)?;
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
    let cid_key = connection_id_key(&reset_key);
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    let mut endpoint = Endpoint::new(config, Some(server), socket, Arc::new(TokioRuntime))
        .map_err(|source| EndpointError::Start { addr, source })?;
    if let Some(client) = client {
        endpoint.set_default_client_config(client);
    }
    Ok(endpoint)
}

/// The key of the connection-id generator, derived from the reset key (so stable as well).
fn connection_id_key(reset_key: &ring::hmac::Key) -> u64 {
    let tag = ring::hmac::sign(reset_key, b"dfs connection ids v1");
    u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("HMAC-SHA256 is 32 bytes"))
}

/// A client-only endpoint on an ephemeral port, reaching IPv6 and IPv4 peers (IPv4 only where
/// the host has IPv6 disabled).
pub fn client(client: quinn::ClientConfig) -> Result<Endpoint, EndpointError> {
    let dual: SocketAddr = "[::]:0".parse().expect("literal");
    let v4: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    let (socket, addr) = match bind_udp(dual) {
        Ok(socket) => (socket, dual),
        Err(_) => (bind_udp(v4)?, v4),
    };
    let mut endpoint = Endpoint::new(EndpointConfig::default(), None, socket, Arc::new(TokioRuntime))
        .map_err(|source| EndpointError::Start { addr, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
