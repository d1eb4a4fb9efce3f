//! The POSIX conformance suite pjdfstest, run against a dfs mount. Every case must pass except
//! those listed in tests/pjdfstest/known-failures.txt, and every listed case must still fail
//! (so that the list stays true).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use dfs_tests::{Cluster, bin, run};

/// The pjdfstest release the suite is pinned to.
const VERSION: &str = "0.2.2";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// pjdfstest from PATH or cargo's bin directory, else installed under target/ (it needs
/// libacl1-dev to build, which .ci/run installs).
fn pjdfstest() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let tools = manifest_dir().join("../target/tools");
    let candidates = [cargo_home.join("bin/pjdfstest"), tools.join("bin/pjdfstest")];
    if let Some(found) = candidates.iter().find(|p| p.exists()) {
        return found.clone();
    }
    let out = Command::new("cargo")
        .args(["install", "--locked", "pjdfstest", "--version", VERSION, "--root"])
        .arg(&tools)
        .output()
        .expect("cargo install pjdfstest");
    assert!(
        out.status.success(),
        "cannot install pjdfstest {VERSION} (it needs the libacl1-dev package):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tools.join("bin/pjdfstest")
}

fn known_failures() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(manifest_dir().join("pjdfstest/known-failures.txt")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, reason) = l
                .split_once(" # ")
                .unwrap_or_else(|| panic!("no reason given for {l:?}"));
            (name.trim().to_owned(), reason.trim().to_owned())
        })
        .collect()
}

/// Test name -> "ok" | "FAILED" | "skipped", from pjdfstest's report.
fn outcomes(report: &str) -> BTreeMap<String, String> {
    report
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (name, outcome) = (words.next()?, words.next()?);
            (words.next().is_none() && name.contains("::") && matches!(outcome, "ok" | "FAILED" | "skipped"))
                .then(|| (name.to_owned(), outcome.to_owned()))
        })
        .collect()
}

#[test]
fn pjdfstest_passes_except_known_failures() {
    let tool = pjdfstest();
    let mut cluster = Cluster::start(2);
    // The suite switches to unprivileged users, who must be able to reach the mount point.
    std::fs::set_permissions(cluster.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = cluster.mount();
    let work = mnt.join("pjdfstest");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    // EXDEV cases need a second file system.
    let secondary = tempfile::tempdir().unwrap();
    // mount(8) remounts a dfs mount through mount.fuse3, which runs `dfs` from a fixed PATH:
    // in a private mount namespace, /usr/local/bin holds this build's `dfs`.
    let helper_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(bin("dfs"), helper_dir.path().join("dfs")).unwrap();
    let conf = manifest_dir().join("pjdfstest/pjdfstest.toml");
    // The runner process leaks descriptors open for writing in some cases (open::*,
    // posix_fallocate::affected_only_create_flags), after which no file system (tmpfs
    // included) can be remounted read-only. So the suite runs in three processes: the EROFS
    // cases (which remount) first, then everything else without remounts, then posix_fallocate.
    let variant = |keep: &dyn Fn(&str) -> bool, remount: bool| {
        let text = std::fs::read_to_string(&conf).unwrap();
        let text: String = text
            .lines()
            .filter(|l| keep(l))
            .map(|l| match l.starts_with("allow_remount") {
                true => format!("allow_remount = {remount}\n"),
                false => format!("{l}\n"),
            })
            .collect();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    };
    let without_fallocate = |l: &str| !l.starts_with("posix_fallocate");
    let remounting = variant(&without_fallocate, true);
    let plain = variant(&without_fallocate, false);
    let suite = |conf: &Path, pattern: &str| {
        let script = format!(
            "mount --bind {helper} /usr/local/bin && cd {work} && exec {tool} -c {conf} -p {work} -s {secondary} {pattern}",
            helper = helper_dir.path().display(),
            work = work.display(),
            tool = tool.display(),
            conf = conf.display(),
            secondary = secondary.path().display(),
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run pjdfstest");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let mut report = String::new();
    let mut results = BTreeMap::new();
    for (conf, pattern) in [
        (plain.path(), ""),
        (remounting.path(), "erofs"),
        (conf.as_path(), "posix_fallocate"),
    ] {
        let part = suite(conf, pattern);
        // A case skipped in one run (no remounts, feature off) and run in another counts as run.
        for (name, outcome) in outcomes(&part) {
            if outcome != "skipped" || !results.contains_key(&name) {
                results.insert(name, outcome);
            }
        }
        report.push_str(&part);
    }
    assert!(
        results.len() > 300,
        "pjdfstest ran only {} cases:\n{report}",
        results.len()
    );
    let known = known_failures();
    let failed: BTreeSet<&String> = results.iter().filter(|(_, o)| *o == "FAILED").map(|(n, _)| n).collect();
    let unexpected: Vec<&&String> = failed.iter().filter(|n| !known.contains_key(n.as_str())).collect();
    let fixed: Vec<&String> = known
        .keys()
        .filter(|n| results.get(n.as_str()).is_some_and(|o| o == "ok"))
        .collect();
    let passed = results.values().filter(|o| *o == "ok").count();
    let skipped = results.values().filter(|o| *o == "skipped").count();
    println!(
        "pjdfstest {VERSION}: {passed} passed, {} failed ({} known), {skipped} skipped, {} in all",
        failed.len(),
        failed.len() - unexpected.len(),
        results.len()
    );
    assert!(
        unexpected.is_empty(),
        "pjdfstest cases failed: {unexpected:?}\n{report}"
    );
    assert!(
        fixed.is_empty(),
        "listed as known failures but now pass (remove them from known-failures.txt): {fixed:?}"
    );
    // The mount is still healthy afterwards.
    run(Command::new("ls").arg(&mnt));
    assert!(Path::new(&mnt).join("pjdfstest").is_dir());
}
