//! The unit files are valid, and their ExecStart binaries are the ones this tree builds.

use std::path::Path;
use std::process::Command;

use dfs_tests::bin;

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        panic!("systemd-analyze is not installed (apt-get install systemd)");
    }
    // A throwaway root holding the distribution's units, ours, and the freshly built binaries
    // where the units expect them, so verify checks the real ExecStart paths.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["usr/lib/systemd", "usr/local/bin", "etc/systemd/system", "bin"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    copy_tree(Path::new("/usr/lib/systemd/system"), &r.join("usr/lib/systemd"));
    for b in ["dfs-metaserver", "dfs-storaged", "dfs-mount"] {
        std::fs::copy(bin(b), r.join("usr/local/bin").join(b)).unwrap();
    }
    std::fs::copy("/bin/mkdir", r.join("bin/mkdir")).unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for e in std::fs::read_dir(&units).unwrap().flatten() {
        std::fs::copy(e.path(), r.join("etc/systemd/system").join(e.file_name())).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", r.display()))
        .args([
            "dfs-metaserver.service",
            "dfs-storaged@storage-1.service",
            "dfs-mount@mnt-dfs.service",
        ])
        .current_dir(r.join("etc/systemd/system"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("dfs")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}
