//! Tests of the piece store over real directories.

use super::*;

fn max_entries(dir: &Path) -> usize {
    let mut max = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap()).collect();
        max = max.max(entries.len());
        for e in entries {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    max
}

#[test]
fn write_read_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    let mut w = store.begin_write(42, None).unwrap();
    w.write_at(0, b"hello ").unwrap();
    w.write_at(6, b"world").unwrap();
    assert_eq!(w.commit().unwrap(), 11);
    let mut buf = [0u8; 32];
    let n = store.read(42, 6, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"world");
    assert_eq!(store.usage().pieces, 1);
    assert_eq!(store.usage().bytes, 11);
    assert!(store.delete(42).unwrap());
    assert!(!store.delete(42).unwrap());
    assert!(matches!(
        store.read(42, 0, &mut buf),
        Err(StoreError::NotFound { piece: 42 })
    ));
    assert_eq!(store.usage().pieces, 0);
    // Deleting the only piece pruned its directories.
    assert_eq!(fs::read_dir(store.layout().pieces_dir()).unwrap().count(), 0);
}

#[test]
fn copy_on_write_from_base() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    let mut w = store.begin_write(1, None).unwrap();
    w.write_at(0, b"abcdefgh").unwrap();
    w.commit().unwrap();
    let mut w = store.begin_write(2, Some(BasePiece { piece: 1, len: 6 })).unwrap();
    w.write_at(2, b"XY").unwrap();
    assert_eq!(w.commit().unwrap(), 6);
    let mut buf = [0u8; 16];
    let n = store.read(2, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"abXYef");
}

#[test]
fn uncommitted_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    let mut w = store.begin_write(9, None).unwrap();
    w.write_at(0, b"lost").unwrap();
    drop(w);
    assert_eq!(fs::read_dir(store.layout().tmp_dir()).unwrap().count(), 0);
    assert!(store.inventory().unwrap().is_empty());
    assert_eq!(crate::layout::LOCK_FILE, "lock");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        6,
        "only pieces/, tmp/, the lock file, the layout marker and the journal's two files: {names:?}"
    );
}

#[test]
fn thousands_of_pieces_keep_directories_small_and_are_counted_again_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        for id in (0..3000u64).map(|i| i * 7 + 1) {
            let mut w = store.begin_write(id, None).unwrap();
            w.write_at(0, &id.to_le_bytes()).unwrap();
            w.commit().unwrap();
        }
        for id in (0..3000u64).filter(|i| i % 3 == 0).map(|i| i * 7 + 1) {
            store.delete(id).unwrap();
        }
        assert!(max_entries(dir.path()) <= 36);
    }
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    assert_eq!(store.usage().pieces, 2000);
    assert_eq!(store.usage().bytes, 2000 * 8);
    let inv = store.inventory().unwrap();
    assert_eq!(inv.len(), 2000);
    assert_eq!(inv[0].piece, 8);
}

#[test]
fn named_temporary_files_work_where_o_tmpfile_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open_with(dir.path(), 36, 0, false, Some(journal::DEFAULT_FILE_SIZE)).unwrap());
    assert!(!store.unnamed_temps);
    let mut w = store.begin_write(5, None).unwrap();
    w.write_at(0, b"named").unwrap();
    assert_eq!(count_entries(&store.layout().tmp_dir()), 1);
    w.commit().unwrap();
    assert_eq!(count_entries(&store.layout().tmp_dir()), 0, "temporaries are pruned");
    let mut buf = [0u8; 8];
    let n = store.read(5, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"named");
    let mut w = store.begin_write(6, None).unwrap();
    w.write_at(0, b"abandoned").unwrap();
    drop(w);
    assert_eq!(count_entries(&store.layout().tmp_dir()), 0);
}

/// Files (not directories) anywhere under `dir`.
fn count_entries(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn second_daemon_on_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _a = PieceStore::open(dir.path(), 36, 0).unwrap();
    assert!(matches!(
        PieceStore::open(dir.path(), 36, 0),
        Err(StoreError::Locked { .. })
    ));
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

fn store_with(dir: &Path, piece: PieceId, data: &[u8]) -> Arc<PieceStore> {
    let store = Arc::new(PieceStore::open(dir, 36, 0).unwrap());
    put(&store, piece, data);
    store
}

fn put(store: &Arc<PieceStore>, piece: PieceId, data: &[u8]) {
    let mut w = store.begin_write(piece, None).unwrap();
    w.write_at(0, data).unwrap();
    assert_eq!(w.commit().unwrap(), data.len() as u64);
}

/// XORs one byte of a piece file at `offset` (from the end when negative).
fn flip_byte(store: &PieceStore, piece: PieceId, offset: i64) {
    let path = store.layout().piece_path(piece);
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let at = if offset < 0 {
        f.metadata().unwrap().len() - offset.unsigned_abs()
    } else {
        offset as u64
    };
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
}

const B: usize = BLOCK_SIZE as usize;

#[test]
fn lengths_are_data_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let len = 2 * B + 123;
    let store = store_with(dir.path(), 7, &pattern(len, 1));
    let file_size = fs::metadata(store.layout().piece_path(7)).unwrap().len();
    assert_eq!(file_size, piece_format::file_len(len as u64));
    assert!(file_size > len as u64);
    assert_eq!(store.piece_len(7).unwrap(), len as u64);
    assert_eq!(store.usage().bytes, len as u64);
    assert_eq!(store.inventory().unwrap()[0].len, len as u64);
    // Rewriting the same piece replaces its bytes in the count; reopening counts the same.
    put(&store, 7, &pattern(10, 2));
    assert_eq!((store.usage().pieces, store.usage().bytes), (1, 10));
    drop(store);
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    assert_eq!((store.usage().pieces, store.usage().bytes), (1, 10));
    assert!(store.delete(7).unwrap());
    assert_eq!((store.usage().pieces, store.usage().bytes), (0, 0));
    // An empty piece is a piece of 0 bytes.
    put(&store, 8, b"");
    assert_eq!(store.piece_len(8).unwrap(), 0);
    assert_eq!(store.read(8, 0, &mut [0u8; 4]).unwrap(), 0);
}

#[test]
fn out_of_order_segments_read_back_over_any_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    let data = pattern(3 * B + 500, 3);
    let mut w = store.begin_write(1, None).unwrap();
    // Back to front, in uneven segments straddling block boundaries.
    let cuts = [0, 1000, B + 7, 2 * B, 3 * B + 1, data.len()];
    for pair in cuts.windows(2).rev() {
        w.write_at(pair[0] as u64, &data[pair[0]..pair[1]]).unwrap();
    }
    assert_eq!(w.commit().unwrap(), data.len() as u64);
    let reader = store.open_reader(1).unwrap();
    for (offset, len) in [
        (0, data.len()),
        (0, B),
        (1, B),
        (B - 1, 2),
        (B, 2 * B),
        (100, 3 * B),
        (3 * B, 500),
        (3 * B + 499, 10),
        (data.len() - 1, 1),
        (7, 5),
    ] {
        let mut buf = vec![0u8; len];
        let n = reader.read(offset as u64, &mut buf).unwrap();
        let end = (offset + len).min(data.len());
        assert_eq!(n, end - offset, "read {offset}+{len}");
        assert_eq!(&buf[..n], &data[offset..end], "read {offset}+{len}");
    }
    assert_eq!(reader.read(data.len() as u64, &mut [0u8; 8]).unwrap(), 0);
    assert_eq!(reader.read(u64::MAX, &mut [0u8; 8]).unwrap(), 0);
    assert!(store.take_corrupt().is_empty());
}

#[test]
fn damaged_data_byte_is_detected_on_read_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 * B, 4);
    let store = store_with(dir.path(), 11, &data);
    flip_byte(&store, 11, (B + 10) as i64);
    let mut buf = vec![0u8; 100];
    // Blocks the read does not touch still read fine.
    assert_eq!(store.read(11, 0, &mut buf).unwrap(), 100);
    assert_eq!(store.read(11, 2 * B as u64, &mut buf).unwrap(), 100);
    assert!(store.take_corrupt().is_empty());
    // Any read touching block 1 fails, even one not covering the damaged byte.
    let err = store.read(11, B as u64 - 50, &mut buf).unwrap_err();
    match &err {
        StoreError::Corrupt {
            piece: 11,
            offset,
            reason: FormatError::BlockChecksum { block: 1, .. },
            ..
        } => assert_eq!(*offset, B as u64),
        other => panic!("expected corruption in block 1, got {other:?}"),
    }
    assert_eq!(err.to_remote().kind, WireKind::Corrupt);
    assert!(matches!(
        store.read(11, 2 * B as u64 - 1, &mut buf),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(store.take_corrupt(), vec![11], "reported once");
    assert!(store.take_corrupt().is_empty());
    // Checking without reporting (the copier, about to replace it) sees it too.
    assert!(matches!(store.verified_len(11), Err(StoreError::Corrupt { .. })));
    assert!(store.take_corrupt().is_empty());
    // A fresh copy replaces it.
    store.read(11, B as u64, &mut buf).unwrap_err();
    put(&store, 11, &data);
    assert!(store.take_corrupt().is_empty(), "the damaged copy is gone");
    assert_eq!(store.verified_len(11).unwrap(), data.len() as u64);
}

#[test]
fn garbled_or_missing_trailer_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(B + 10, 5);
    let store = store_with(dir.path(), 1, &data);
    put(&store, 2, &data);
    put(&store, 3, &data);
    put(&store, 4, &data);
    flip_byte(&store, 1, -1); // footer checksum
    flip_byte(&store, 2, -20); // footer data length
    flip_byte(&store, 3, data.len() as i64); // crc of block 0
    // Piece 4 loses its trailer altogether.
    let f = OpenOptions::new()
        .write(true)
        .open(store.layout().piece_path(4))
        .unwrap();
    f.set_len(data.len() as u64).unwrap();
    let mut buf = [0u8; 16];
    for piece in 1..=4 {
        assert!(
            matches!(store.read(piece, 0, &mut buf), Err(StoreError::Corrupt { piece: p, .. }) if p == piece),
            "piece {piece}"
        );
    }
    assert!(matches!(store.piece_len(1), Err(StoreError::Corrupt { .. })));
    assert_eq!(store.take_corrupt(), vec![1, 2, 3, 4]);
    // Damaged files still list, and deleting them keeps the counts right (counted afresh:
    // truncating a file behind the store's back changes what it counts for).
    drop(store);
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    assert_eq!(store.inventory().unwrap().len(), 4);
    for piece in 1..=4 {
        assert!(store.delete(piece).unwrap());
    }
    assert_eq!((store.usage().pieces, store.usage().bytes), (0, 0));
}

#[test]
fn copy_from_base_verifies_what_it_copies() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 * B, 6);
    let store = store_with(dir.path(), 1, &data);
    // Copying the first block and part of the second, with a new last byte.
    let mut w = store
        .begin_write(
            2,
            Some(BasePiece {
                piece: 1,
                len: B as u64 + 9,
            }),
        )
        .unwrap();
    w.write_at(B as u64 + 9, b"!").unwrap();
    assert_eq!(w.commit().unwrap(), B as u64 + 10);
    let mut buf = vec![0u8; 2 * B];
    let n = store.read(2, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n - 1], &data[..B + 9]);
    assert_eq!(buf[n - 1], b'!');
    // A base with damage in a block the copy reads (block 1, past the copied bytes but in
    // the block they end in) fails the write and is reported.
    flip_byte(&store, 1, (B + 100) as i64);
    let result = store.begin_write(
        3,
        Some(BasePiece {
            piece: 1,
            len: B as u64 + 9,
        }),
    );
    assert!(matches!(result, Err(StoreError::Corrupt { piece: 1, .. })));
    assert_eq!(store.take_corrupt(), vec![1]);
    assert!(matches!(store.read(3, 0, &mut buf), Err(StoreError::NotFound { .. })));
    // Damage beyond the copied range does not matter to the copy.
    let mut w = store.begin_write(4, Some(BasePiece { piece: 1, len: 100 })).unwrap();
    w.write_at(0, b"x").unwrap();
    assert_eq!(w.commit().unwrap(), 100);
    // A base with a garbled trailer cannot be copied at all.
    flip_byte(&store, 2, -3);
    assert!(matches!(
        store.begin_write(5, Some(BasePiece { piece: 2, len: 10 })),
        Err(StoreError::Corrupt { piece: 2, .. })
    ));
}

#[test]
fn capacity_limit_gives_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 10).unwrap());
    let mut w = store.begin_write(1, None).unwrap();
    assert!(matches!(w.write_at(0, &[0u8; 11]), Err(StoreError::NoSpace { .. })));
}

#[test]
fn a_data_directory_keeps_its_fanout_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
        let mut w = store.begin_write(36, None).unwrap();
        w.write_at(0, b"piece thirty-six").unwrap();
        w.commit().unwrap();
    }
    let refused = PieceStore::open(dir.path(), 16, 0)
        .err()
        .expect("another fanout is refused");
    let msg = refused.to_string();
    assert!(
        matches!(
            refused,
            StoreError::FanoutMismatch {
                recorded: 36,
                configured: 16,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("fanout = 36"), "{msg}");
    let store = PieceStore::open(dir.path(), 36, 0).unwrap();
    let mut buf = [0u8; 16];
    store.read(36, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"piece thirty-six");
}

#[test]
fn a_piece_file_under_another_piece_name_is_corrupt_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    let mut w = store.begin_write(1, None).unwrap();
    w.write_at(0, b"one").unwrap();
    w.commit().unwrap();
    let misplaced = store.layout().piece_path(2);
    fs::create_dir_all(misplaced.parent().unwrap()).unwrap();
    fs::copy(store.layout().piece_path(1), &misplaced).unwrap();
    let mut buf = [0u8; 3];
    let e = store.read(2, 0, &mut buf).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("holds piece 1, not piece 2"), "{e}");
    assert_eq!(store.take_corrupt(), vec![2]);
}

/// Found by the randomized soak: a write whose directory was pruned by a concurrent delete of
/// its last piece, between being found (or made) and its subdirectory being made, failed with
/// "create directory ...: No such file or directory".
#[test]
fn writes_survive_concurrent_pruning_of_their_directories() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    // Pieces 36*36 + k share the directories `1/0`, which every delete of the last one prunes.
    let base = 36 * 36;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while std::time::Instant::now() < deadline {
                    let piece = base + t;
                    let mut w = store.begin_write(piece, None).unwrap();
                    w.write_at(0, b"data").unwrap();
                    w.commit()
                        .unwrap_or_else(|e| panic!("round {rounds} of thread {t}: {e}"));
                    assert!(store.delete(piece).unwrap());
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap() > 0);
    }
}

/// The journal files as a crash would leave them: copied while the store runs (a clean stop
/// checkpoints them).
fn journal_snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    journal::JOURNAL_FILES
        .iter()
        .map(|n| (root.join(n), fs::read(root.join(n)).unwrap()))
        .collect()
}

fn put_back(snapshot: &[(PathBuf, Vec<u8>)]) {
    for (path, bytes) in snapshot {
        fs::write(path, bytes).unwrap();
    }
}

fn write_piece(store: &Arc<PieceStore>, piece: PieceId, data: &[u8]) {
    let mut w = store.begin_write(piece, None).unwrap();
    w.write_at(0, data).unwrap();
    w.commit().unwrap();
}

fn read_all(store: &PieceStore, piece: PieceId) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    let n = store.read(piece, 0, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn journaled_pieces_lost_by_a_crash_are_written_again_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    write_piece(&store, 1, b"one, whose file a power cut lost");
    write_piece(&store, 2, b"two, whose file a power cut left half written");
    write_piece(&store, 3, b"three, whose file survived");
    let big = vec![9u8; (journal::MAX_JOURNALED_FILE + 1) as usize];
    write_piece(&store, 4, &big);
    let crashed = journal_snapshot(dir.path());
    let records = journal::recover(dir.path()).unwrap();
    let journaled: Vec<PieceId> = records.iter().map(|r| r.piece).collect();
    assert_eq!(journaled, vec![1, 2, 3], "the large piece was fsync'd, not journaled");
    drop(store);
    assert!(
        journal::recover(dir.path()).unwrap().is_empty(),
        "a clean stop checkpoints"
    );

    // What a power cut can leave of files that were never fsync'd.
    let layout = Layout::new(dir.path(), 36);
    fs::remove_file(layout.piece_path(1)).unwrap();
    let two = layout.piece_path(2);
    let len = fs::metadata(&two).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&two)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    put_back(&crashed);

    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    assert_eq!(read_all(&store, 1), b"one, whose file a power cut lost");
    assert_eq!(read_all(&store, 2), b"two, whose file a power cut left half written");
    assert_eq!(read_all(&store, 3), b"three, whose file survived");
    assert_eq!(read_all(&store, 4), big);
    assert_eq!(store.usage().pieces, 4);
    assert!(
        journal::recover(dir.path()).unwrap().is_empty(),
        "replayed, then started afresh"
    );
}

#[test]
fn a_rewritten_piece_is_not_journaled_and_a_replay_keeps_the_newer_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    write_piece(&store, 5, b"first version");
    write_piece(&store, 5, b"second version, fsync'd");
    let crashed = journal_snapshot(dir.path());
    let records = journal::recover(dir.path()).unwrap();
    assert_eq!(records.len(), 1);
    drop(store);
    put_back(&crashed);
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    assert_eq!(read_all(&store, 5), b"second version, fsync'd");
}

#[test]
fn without_the_journal_pieces_are_fsynced_and_leftover_records_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    write_piece(&store, 6, b"journaled before the journal was turned off");
    let crashed = journal_snapshot(dir.path());
    drop(store);
    fs::remove_file(Layout::new(dir.path(), 36).piece_path(6)).unwrap();
    put_back(&crashed);
    let store = Arc::new(PieceStore::open_with_journal(dir.path(), 36, 0, false).unwrap());
    assert_eq!(read_all(&store, 6), b"journaled before the journal was turned off");
    for name in journal::JOURNAL_FILES {
        assert!(!dir.path().join(name).exists(), "{name} removed");
    }
    write_piece(&store, 7, b"fsync'd");
    assert_eq!(read_all(&store, 7), b"fsync'd");
    assert!(journal::recover(dir.path()).unwrap().is_empty());
}

#[test]
fn concurrent_small_writes_all_land_through_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let piece = 1000 + t * 100 + i;
                    write_piece(&store, piece, format!("piece {piece}").as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let crashed = journal_snapshot(dir.path());
    let mut journaled: Vec<PieceId> = journal::recover(dir.path()).unwrap().iter().map(|r| r.piece).collect();
    journaled.sort();
    assert_eq!(journaled.len(), 200, "every piece in the journal, none twice");
    journaled.dedup();
    assert_eq!(journaled.len(), 200);
    drop(store);
    // All files lost: the journal alone brings every piece back.
    fs::remove_dir_all(Layout::new(dir.path(), 36).pieces_dir()).unwrap();
    fs::create_dir(Layout::new(dir.path(), 36).pieces_dir()).unwrap();
    put_back(&crashed);
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    for piece in journaled {
        assert_eq!(read_all(&store, piece), format!("piece {piece}").as_bytes());
    }
    assert!(max_entries(dir.path()) <= 36);
}

#[test]
fn a_piece_journaled_twice_comes_back_as_last_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    write_piece(&store, 8, b"first, then deleted");
    assert!(store.delete(8).unwrap());
    write_piece(&store, 8, b"written again");
    let crashed = journal_snapshot(dir.path());
    assert_eq!(journal::recover(dir.path()).unwrap().len(), 2);
    drop(store);
    fs::remove_file(Layout::new(dir.path(), 36).piece_path(8)).unwrap();
    put_back(&crashed);
    let store = Arc::new(PieceStore::open(dir.path(), 36, 0).unwrap());
    assert_eq!(read_all(&store, 8), b"written again");
}
