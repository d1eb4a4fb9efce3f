//! File name rules shared by the mount (early, friendly errors) and the metaserver (the authority).

use crate::error::{ErrorKind, RemoteError};

/// Longest file name, in bytes (NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, in bytes (PATH_MAX).
pub const MAX_SYMLINK_LEN: usize = 4095;

/// A name for one directory entry: any bytes except `/` and NUL, not `.` or `..`, 1..=255 bytes.
pub fn validate_name(name: &[u8]) -> Result<(), RemoteError> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.len() > MAX_NAME_LEN {
        return Err(RemoteError::new(
            ErrorKind::NameTooLong,
            format!("name of {} bytes exceeds {MAX_NAME_LEN} bytes", name.len()),
        ));
    }
    if name.is_empty() || name == b"." || name == b".." {
        return Err(RemoteError::new(
            ErrorKind::InvalidArgument,
            format!("invalid name {:?}", shown()),
        ));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(RemoteError::new(
            ErrorKind::InvalidArgument,
            format!("name {:?} contains '/' or NUL", shown()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        validate_name(b"a").unwrap();
        validate_name(&[0xff, 0xfe, b'x']).unwrap();
        validate_name(&[b'n'; 255]).unwrap();
        assert_eq!(validate_name(&[b'n'; 256]).unwrap_err().kind, ErrorKind::NameTooLong);
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(validate_name(bad).unwrap_err().kind, ErrorKind::InvalidArgument);
        }
    }
}
