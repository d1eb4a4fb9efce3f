//! Mutual TLS for every QUIC connection: both sides present a certificate issued by the
//! cluster's own CA, and a peer whose certificate does not chain to that CA is refused during
//! the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// ALPN protocol id: bumps when the wire format changes incompatibly.
pub const ALPN: &[u8] = b"dfs/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}")]
    ReadCert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {path}")]
    NoCert { path: PathBuf },
    #[error("cannot read private key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA certificate {path} is not usable as a trust root: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// The files that make up one process's cluster identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loaded, parsed identity plus the cluster CA.
#[derive(Debug)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: path.to_owned() });
    }
    Ok(certs)
}

impl TlsIdentity {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca_cert)? {
            roots.add(ca).map_err(|source| TlsError::BadCa {
                path: files.ca_cert.clone(),
                source,
            })?;
        }
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::ReadKey {
            path: files.key.clone(),
            source,
        })?;
        Ok(TlsIdentity {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// Server side: requires a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(crate::endpoint::transport_config()));
        Ok(config)
    }

    /// A secret that stays the same across restarts of this process (derived from its private
    /// key): it keys QUIC stateless resets, so a restarted server can tell its old peers their
    /// connections are gone, and they reconnect at once instead of waiting out a timeout.
    pub fn reset_secret(&self) -> [u8; 32] {
        let mut input = b"dfs stateless reset v1".to_vec();
        input.extend_from_slice(self.key.secret_der());
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
    }

    /// Client side: trusts only the cluster CA and presents this identity.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::endpoint::transport_config()));
        Ok(config)
    }
}
