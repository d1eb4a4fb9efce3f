//! The cluster CA and the certificates it issues (used by `dfs cert` and `dfs up`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Node names double as TLS server names, so they must be valid DNS names.
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let bad = |reason| {
        Err(CertError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated part must be 1 to 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return bad("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a part may not start or end with '-'");
        }
    }
    if name.parse::<std::net::IpAddr>().is_ok() || name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return bad("must not look like an IP address");
    }
    Ok(())
}

/// Creates a new self-signed cluster CA.
pub fn generate_ca(common_name: &str) -> Result<PemPair, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "dfs");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for `name` (a metaserver, storage daemon or client), usable both as a
/// TLS server and a TLS client. `extra_sans` may hold further DNS names or IP addresses.
pub fn issue(ca: &PemPair, name: &str, extra_sans: &[String]) -> Result<PemPair, CertError> {
    validate_name(name)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "dfs");
    params.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(name.try_into()?)];
    for san in extra_sans {
        sans.push(match san.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.as_str().try_into()?),
        });
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Conventional file names inside a certificate directory.
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.crt"))
}

pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists { path: path.to_owned() }
            } else {
                CertError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|source| CertError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Writes `NAME.crt` (0644) and `NAME.key` (0600) into `dir`, never overwriting.
pub fn write_pair(dir: &Path, name: &str, pair: &PemPair) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write_new(&key_path(dir, name), &pair.key_pem, 0o600)?;
    write_new(&cert_path(dir, name), &pair.cert_pem, 0o644)
}

pub fn read_pair(dir: &Path, name: &str) -> Result<PemPair, CertError> {
    let read = |path: PathBuf| fs::read_to_string(&path).map_err(|source| CertError::Read { path, source });
    Ok(PemPair {
        cert_pem: read(cert_path(dir, name))?,
        key_pem: read(key_path(dir, name))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names() {
        for ok in ["metaserver", "storage-1", "host.example.org", "a1"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-x", "x-", "a/b", "a b", "10.0.0.1", "a..b", "ü"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn issued_certificate_is_written_with_private_key_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test CA").unwrap();
        write_pair(dir.path(), "ca", &ca).unwrap();
        let leaf = issue(&ca, "storage-1", &["127.0.0.1".into()]).unwrap();
        write_pair(dir.path(), "storage-1", &leaf).unwrap();
        let mode = fs::metadata(key_path(dir.path(), "storage-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            write_pair(dir.path(), "storage-1", &leaf),
            Err(CertError::Exists { .. })
        ));
        let back = read_pair(dir.path(), "ca").unwrap();
        assert_eq!(back.cert_pem, ca.cert_pem);
    }
}
