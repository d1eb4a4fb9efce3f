//! `dfs` as the mount helper of its own mounts. A dfs mount's source is "dfs", so mount(8)
//! hands requests about it (`mount -o remount,ro /mnt/dfs`) to `mount.fuse3`, which runs
//! `dfs MOUNTPOINT -o OPTIONS`. Remounts only change the generic flags of the mount, which the
//! kernel applies itself.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The arguments `mount.fuse3` passes: `MOUNTPOINT -o OPTIONS`.
pub fn invocation(args: &[OsString]) -> Option<(&Path, &str)> {
    match args {
        [_, mountpoint, dash_o, options] if dash_o == "-o" => {
            let mountpoint = Path::new(mountpoint);
            mountpoint.is_absolute().then_some(())?;
            Some((mountpoint, options.to_str()?))
        }
        _ => None,
    }
}

/// The mount(2) flags a remount with `options` asks for.
pub fn remount_flags(options: &str) -> Result<libc::c_ulong, String> {
    let mut flags = 0;
    let mut remount = false;
    for opt in options.split(',') {
        match opt {
            "remount" => remount = true,
            "ro" => flags |= libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            _ => {}
        }
    }
    if !remount {
        return Err("only remounts go through `dfs`; mount with `dfs-mount --config FILE MOUNTPOINT`".into());
    }
    Ok(flags | libc::MS_REMOUNT)
}

/// How long a read-only remount waits for files the kernel is still releasing.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub fn run(mountpoint: &Path, options: &str) -> Result<(), String> {
    let flags = remount_flags(options)?;
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    loop {
        // SAFETY: the target is a valid C string; null source, type and data are allowed for
        // a remount.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // FUSE releases closed files asynchronously; a file unlinked and closed a moment ago
        // keeps a read-only remount busy until its release is done.
        if err.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < BUSY_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        return Err(format!("cannot remount {}: {err}", mountpoint.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_mount_fuse_arguments_and_flags() {
        let args: Vec<OsString> = ["dfs", "/mnt/dfs", "-o", "ro,nosuid,remount,allow_other"]
            .iter()
            .map(OsString::from)
            .collect();
        let (mp, opts) = invocation(&args).unwrap();
        assert_eq!(mp, Path::new("/mnt/dfs"));
        assert_eq!(
            remount_flags(opts).unwrap(),
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID
        );
        assert!(remount_flags("rw,nosuid").is_err());
        let status: Vec<OsString> = ["dfs", "status"].iter().map(OsString::from).collect();
        assert!(invocation(&status).is_none());
    }
}
