//! Files and trees go through the mount and come back byte for byte, with plain coreutils.

use std::process::Command;

use dfs_tests::{Cluster, Options, bin, cmp, data, run, sh, write_both};

#[test]
fn files_of_every_size_round_trip_with_cp() {
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    let local = tempfile::tempdir().unwrap();
    let sizes: [(&str, u64); 6] = [
        ("zero", 0),
        ("one", 1),
        ("four_k", 4096),
        ("one_m_plus_one", (1 << 20) + 1),
        ("sixty_four_m", 64 << 20),
        ("three_hundred_m", 300 << 20),
    ];
    for (i, (name, size)) in sizes.iter().enumerate() {
        let src = local.path().join(name);
        data::write_file(&src, *size, i as u64);
        run(Command::new("cp").arg(&src).arg(mnt.join(name)));
        cmp(&src, &mnt.join(name));
        assert_eq!(std::fs::metadata(mnt.join(name)).unwrap().len(), *size, "{name}");
    }
    // ls -l shows the sizes.
    let ls = String::from_utf8(run(Command::new("ls").arg("-l").arg(&mnt)).stdout).unwrap();
    for (name, size) in sizes {
        let line = ls
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} in ls:\n{ls}"));
        let field: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(field[4], size.to_string(), "{line}");
    }
    // A second mount sees the same bytes (read path with a cold cache).
    let other = cluster.mount();
    cmp(&local.path().join("three_hundred_m"), &other.join("three_hundred_m"));
    // mv within and across directories, then rm.
    std::fs::create_dir(mnt.join("sub")).unwrap();
    run(Command::new("mv")
        .arg(mnt.join("one_m_plus_one"))
        .arg(mnt.join("sub/moved")));
    cmp(&local.path().join("one_m_plus_one"), &mnt.join("sub/moved"));
    assert!(!mnt.join("one_m_plus_one").exists());
    run(Command::new("mv").arg(mnt.join("four_k")).arg(mnt.join("renamed")));
    cmp(&local.path().join("four_k"), &mnt.join("renamed"));
    run(Command::new("rm").arg(mnt.join("renamed")).arg(mnt.join("sub/moved")));
    assert!(!mnt.join("renamed").exists());
    assert!(!mnt.join("sub/moved").exists());
}

#[test]
fn directories_and_a_thousand_file_tree() {
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    run(Command::new("mkdir").arg("-p").arg(mnt.join("a/b/c")));
    assert!(mnt.join("a/b/c").is_dir());
    run(Command::new("rmdir").arg(mnt.join("a/b/c")));
    assert!(!mnt.join("a/b/c").exists());
    let rmdir_busy = Command::new("rmdir").arg(mnt.join("a")).output().unwrap();
    assert!(!rmdir_busy.status.success(), "rmdir of a non-empty directory must fail");
    assert!(
        String::from_utf8_lossy(&rmdir_busy.stderr).contains("not empty"),
        "{rmdir_busy:?}"
    );
    run(Command::new("rm").arg("-r").arg(mnt.join("a")));
    assert!(!mnt.join("a").exists());

    // A tree of ~1,000 files (various sizes, nested directories) through tar.
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    for d in 0..20 {
        let dir = tree.join(format!("dir{d:02}")).join("nested");
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..50u64 {
            let size = (d as u64 * 7919 + f * 104_729) % 200_000;
            data::write_file(&dir.join(format!("file{f:02}")), size, d as u64 * 100 + f);
        }
    }
    std::os::unix::fs::symlink("dir00/nested/file00", tree.join("link")).unwrap();
    let tarball = local.path().join("tree.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(local.path())
        .arg("tree"));
    run(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&mnt));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&tree)
        .arg(mnt.join("tree")));
    let listed = sh(&format!("find {} -type f | wc -l", mnt.join("tree").display()));
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "1000");
    run(Command::new("rm").arg("-rf").arg(mnt.join("tree")));
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none());
}

#[test]
fn sparse_writes_beyond_four_gib_and_holes_read_as_zeros() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let mut cluster = Cluster::start(2);
    let mnt = cluster.mount();
    let path = mnt.join("sparse");
    let far = 5u64 << 30;
    {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(far)).unwrap();
        f.write_all(b"tail beyond 4 GiB").unwrap();
    }
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), far + 17);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "holes take no space: {} blocks",
        meta.blocks()
    );
    let mut f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0xffu8; 1 << 20];
    f.seek(SeekFrom::Start(far - (1 << 20))).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a hole must read as zeros");
    let mut tail = String::new();
    f.read_to_string(&mut tail).unwrap();
    assert_eq!(tail, "tail beyond 4 GiB");
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut head = [0u8; 8];
    f.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"head\0\0\0\0");
    // Truncating down and up again leaves zeros where the data was.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(2).unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert_eq!(std::fs::read(&path).unwrap(), b"he\0\0\0\0\0\0\0\0");
}

#[test]
fn random_writes_over_many_chunks_revisit_chunks_safely() {
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    let local = tempfile::tempdir().unwrap();
    let chunk = 8u64 << 20;
    let mounted = std::fs::File::create(mnt.join("scattered")).unwrap();
    let model = std::fs::File::create(local.path().join("model")).unwrap();
    // Touch more chunks than a file streams at once, then go back to the first ones: their
    // earlier writes must survive the later ones.
    for round in 0..3u64 {
        for k in 0..7u64 {
            let data = data::bytes(10_000 + (round * 7 + k) as usize, round * 100 + k);
            write_both(&mounted, &model, k * chunk + round * 50_000 + 123, &data);
        }
    }
    mounted.sync_all().unwrap();
    drop(mounted);
    drop(model);
    cmp(&local.path().join("model"), &mnt.join("scattered"));
    let other = cluster.mount();
    cmp(&local.path().join("model"), &other.join("scattered"));
}

/// `copy_file_range` inside the mount (what `cp` does there) gives the same bytes and counts
/// as on a local file system, for aligned whole chunks (copied daemon to daemon), unaligned
/// heads and tails, ranges whose offsets differ within a chunk, copies into the middle of
/// existing data, holes, and the end of the source; copies and sources stay independent
/// afterwards. A whole-file `cp` makes the daemons serve (almost) no reads: its bytes do not
/// pass through the mount.
#[test]
fn copy_file_range_copies_chunks_daemon_to_daemon() {
    use std::os::fd::AsRawFd;
    use std::sync::OnceLock;
    static METRICS_PORTS: OnceLock<Vec<u16>> = OnceLock::new();
    METRICS_PORTS.get_or_init(|| {
        let listeners: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
    });
    const MB: u64 = 1 << 20;
    let mut cluster = Cluster::with(Options {
        storage_daemons: 2,
        tweak: |c| {
            c.metaserver.as_mut().unwrap().chunk_size = MB;
            for (s, port) in c.storaged.iter_mut().zip(METRICS_PORTS.get().unwrap()) {
                s.metrics_listen = Some(format!("127.0.0.1:{port}"));
            }
        },
        ..Options::default()
    });
    let daemon_reads = || -> u64 {
        METRICS_PORTS
            .get()
            .unwrap()
            .iter()
            .map(|port| {
                let out = run(Command::new(bin("dfs"))
                    .args(["metrics", "--raw"])
                    .arg(format!("http://127.0.0.1:{port}/metrics")));
                let text = String::from_utf8(out.stdout).unwrap();
                text.lines()
                    .filter(|l| l.starts_with("dfs_storaged_read_bytes"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            })
            .sum()
    };
    let mnt = cluster.mount();
    let local = tempfile::tempdir().unwrap();
    let (dfs, model) = (mnt.as_path(), local.path());
    let size = 5 * MB + 12_345;
    data::write_file(&model.join("src"), size, 7);
    run(Command::new("cp").arg(model.join("src")).arg(dfs.join("src")));
    for (name, len, seed) in [("over", 4 * MB, 8), ("middle", 4 * MB, 9)] {
        data::write_file(&model.join(name), len, seed);
        run(Command::new("cp").arg(model.join(name)).arg(dfs.join(name)));
    }
    // A sparse source: a hole, 100 bytes, a hole to the end.
    for root in [dfs, model] {
        let f = std::fs::File::create(root.join("sparse")).unwrap();
        f.set_len(3 * MB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[5u8; 100], 2 * MB + MB / 2).unwrap();
    }

    // A whole-file cp: through copy_file_range, the bytes stay on the daemons.
    let before = daemon_reads();
    run(Command::new("cp").arg(dfs.join("src")).arg(dfs.join("copy")));
    let served = daemon_reads() - before;
    eprintln!("cp of {size} bytes within the mount: the daemons served {served} bytes to it");
    std::fs::copy(model.join("src"), model.join("copy")).unwrap();
    assert!(
        served < size / 4,
        "cp of a {size}-byte file made the daemons serve {served} bytes to the mount"
    );

    // The same copy_file_range calls on dfs and on a local directory: same counts, same bytes.
    let copy_all = |root: &std::path::Path, from: &str, off_in: u64, to: &str, off_out: u64, len: u64| -> u64 {
        let src = std::fs::File::open(root.join(from)).unwrap();
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(to))
            .unwrap();
        let (mut off_in, mut off_out) = (off_in as i64, off_out as i64);
        let mut total = 0u64;
        while total < len {
            // SAFETY: valid descriptors and offsets owned by this frame.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (len - total) as usize,
                    0,
                )
            };
            assert!(
                n >= 0,
                "copy_file_range in {}: {}",
                root.display(),
                std::io::Error::last_os_error()
            );
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        dfs_tests::close(dst).unwrap();
        total
    };
    let cases: [(&str, u64, &str, u64, u64); 8] = [
        // Same offset within a chunk: an unaligned head, a whole chunk past the end, a tail.
        ("src", MB + 100, "over", 3 * MB + 100, 2 * MB + 5),
        // Into existing data: a whole chunk, then 10 bytes with data after them.
        ("src", 0, "middle", MB, MB + 10),
        // Offsets that differ within a chunk: all through the mount.
        ("src", 10, "shifted", 0, 3 * MB),
        // Holes read as zeros in the copy, and over existing data.
        ("sparse", 0, "sparse_copy", 0, 3 * MB),
        ("sparse", MB / 2, "over", MB / 2, 2 * MB),
        // Past the end of the source: nothing to copy; asked for more than there is: the rest.
        ("src", size, "none", 0, MB),
        ("src", 4 * MB, "tail", 0, 10 * MB),
        // Within one file.
        ("copy", 0, "copy", 6 * MB, 2 * MB),
    ];
    for (from, off_in, to, off_out, len) in cases {
        let got = copy_all(dfs, from, off_in, to, off_out, len);
        let want = copy_all(model, from, off_in, to, off_out, len);
        assert_eq!(got, want, "copy {from}@{off_in} -> {to}@{off_out} len {len}");
        cmp(&model.join(to), &dfs.join(to));
    }
    // Copies are independent of their sources: writing one leaves the other as it was.
    for root in [dfs, model] {
        let f = std::fs::OpenOptions::new().write(true).open(root.join("copy")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"changed copy", MB + 3).unwrap();
        dfs_tests::close(f).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(root.join("src")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"changed source", 2 * MB).unwrap();
        dfs_tests::close(f).unwrap();
    }
    let other = cluster.mount();
    for name in [
        "src",
        "copy",
        "over",
        "middle",
        "shifted",
        "sparse_copy",
        "none",
        "tail",
    ] {
        cmp(&model.join(name), &other.join(name));
    }
}
