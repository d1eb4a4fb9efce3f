//! Tests of the request handlers with the real committer and database (no sockets), for
//! interleavings of concurrent requests that the namespace functions alone cannot show.

use std::sync::Arc;
use std::time::Duration;

use dfs_proto::ErrorKind;
use dfs_proto::meta::{MAX_RELEASE_BATCH, Open, OpenSession, ReleaseHandles, Unlink};
use dfs_proto::types::{Ino, ROOT_INO, SessionId};

use crate::namespace;
use crate::service::{MetaService, Settings};

pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub svc: Arc<MetaService>,
}

pub(crate) fn settings() -> Settings {
    Settings {
        chunk_size: 1 << 20,
        heartbeat_timeout: Duration::from_secs(5),
        session_timeout: Duration::from_secs(30),
        orphan_piece_grace: Duration::from_secs(3600),
        replicas: 1,
        dead_after: Duration::from_secs(600),
        balance_threshold_percent: 10,
        copies_per_node: 4,
    }
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(&dir.path().join("meta.redb"), 1 << 20).unwrap();
        let svc = MetaService::start(Arc::new(db), dir.path().to_owned(), settings()).unwrap();
        Fixture { _dir: dir, svc }
    }

    pub async fn session(&self) -> SessionId {
        self.svc
            .open_session(OpenSession {
                client: "test".into(),
                resume: None,
                open_files: vec![],
                locks: vec![],
            })
            .await
            .unwrap()
            .session
    }

    pub async fn file(&self, name: &str) -> Ino {
        let name = name.as_bytes().to_vec();
        self.svc
            .write(move |ctx| namespace::create_file(ctx, ROOT_INO, &name, 0o644, 0, 0, true))
            .await
            .unwrap()
            .0
            .ino
    }

    /// Holds the commit thread inside a transaction until the returned sender is used (or
    /// dropped); what is queued meanwhile forms the next transaction.
    pub fn hold_committer(&self) -> std::sync::mpsc::Sender<()> {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let svc = self.svc.clone();
        tokio::spawn(async move {
            svc.write(move |_| {
                let _ = wait.recv();
                Ok(())
            })
            .await
        });
        release
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// An unlink decides, inside its transaction, that nothing has the file open and deletes it.
/// An open arriving before that transaction is durable must not succeed from the old snapshot
/// (its reads would then find the data gone): it waits, and finds the file deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_racing_an_unlink_that_deletes_the_file_does_not_succeed() {
    let f = Fixture::new();
    let session = f.session().await;
    let ino = f.file("victim").await;
    let first = f.hold_committer();
    settle().await;
    // Queued behind the held transaction: the unlink, then a second hold in the same batch.
    let svc = f.svc.clone();
    let unlink = tokio::spawn(async move {
        svc.unlink(Unlink {
            parent: ROOT_INO,
            name: b"victim".to_vec(),
        })
        .await
    });
    settle().await;
    let second = f.hold_committer();
    settle().await;
    first.send(()).unwrap();
    settle().await;
    // The unlink has run inside the second transaction (not yet committed): open now.
    let svc = f.svc.clone();
    let open = tokio::spawn(async move {
        svc.open(Open {
            ino,
            session,
            handle: 1,
            released: vec![],
        })
        .await
    });
    settle().await;
    assert!(
        !open.is_finished(),
        "the open answered before the deletion was durable: {:?}",
        open.await.unwrap().map(|o| o.attr)
    );
    second.send(()).unwrap();
    unlink.await.unwrap().unwrap();
    let opened = open.await.unwrap();
    assert_eq!(opened.err().map(|e| e.kind()), Some(ErrorKind::NotFound));
}

#[tokio::test]
async fn releases_carried_by_an_open_close_the_handles_they_name() {
    let f = Fixture::new();
    let session = f.session().await;
    let a = f.file("a").await;
    let b = f.file("b").await;
    for handle in [1, 2] {
        let open = Open {
            ino: a,
            session,
            handle,
            released: vec![],
        };
        f.svc.open(open).await.unwrap();
    }
    assert!(f.svc.is_open(a));
    let open = Open {
        ino: b,
        session,
        handle: 3,
        released: vec![(1, a), (2, a), (2, a)],
    };
    f.svc.open(open).await.unwrap();
    assert!(!f.svc.is_open(a), "both handles released (one of them twice)");
    assert!(f.svc.is_open(b));
    // More than a batch may hold: refused, and nothing released.
    let handles = (0..=MAX_RELEASE_BATCH as u64).map(|h| (3 + h, b)).collect();
    let e = f
        .svc
        .release_handles(ReleaseHandles { session, handles })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(f.svc.is_open(b));
    let handles = vec![(3, b)];
    f.svc
        .release_handles(ReleaseHandles { session, handles })
        .await
        .unwrap();
    assert!(!f.svc.is_open(b));
}

/// A copied chunk is made by the daemons holding the source chunk, from the source piece, no
/// longer than the source holds; a hole or a directory has nothing to copy.
#[tokio::test]
async fn a_copied_chunk_is_based_on_the_source_piece_on_its_holders() {
    use dfs_proto::meta::{AllocateCopy, AllocatePiece, CommitWrite, RegisterNode, WrittenPiece};
    use dfs_proto::types::NodeUsage;
    let f = Fixture::new();
    let usage = NodeUsage {
        pieces: 0,
        bytes: 0,
        free_bytes: 1 << 40,
        capacity_bytes: 1 << 40,
    };
    let mut nodes = Vec::new();
    for name in ["storage-1", "storage-2"] {
        let registered = f
            .svc
            .register_node(RegisterNode {
                name: name.into(),
                addr: format!("127.0.0.1:{}", 7000 + nodes.len()),
                usage,
                domain: None,
            })
            .await
            .unwrap();
        nodes.push(registered.node);
    }
    let src = f.file("src").await;
    let dst = f.file("dst").await;
    let alloc = f
        .svc
        .allocate_piece(AllocatePiece {
            ino: src,
            chunk: 1,
            exclude: vec![],
        })
        .await
        .unwrap();
    let holder = alloc.nodes[0].id;
    f.svc
        .commit_write(CommitWrite {
            ino: src,
            pieces: vec![WrittenPiece {
                chunk: 1,
                piece: alloc.piece,
                nodes: vec![holder],
                len: 1000,
            }],
            min_size: (1 << 20) + 1000,
            attrs: Default::default(),
            id: Default::default(),
            fence: None,
            pieces_in_flight: false,
        })
        .await
        .unwrap();
    let copy = |src_chunk: u64, len: u64, exclude: Vec<u32>, from: Ino| {
        f.svc.allocate_copy(AllocateCopy {
            ino: dst,
            chunk: 3,
            src_ino: from,
            src_chunk,
            len,
            exclude,
        })
    };
    let copied = copy(1, 5000, vec![], src).await.unwrap();
    assert_eq!(copied.chunk, 3);
    assert_ne!(copied.piece, alloc.piece);
    assert_eq!(copied.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![holder]);
    let base = copied.base.unwrap();
    assert_eq!((base.piece, base.len), (alloc.piece, 1000), "no longer than the source");
    assert_eq!(copy(1, 10, vec![], src).await.unwrap().base.unwrap().len, 10);
    // The only holder excluded: nobody else has the bytes.
    let e = copy(1, 10, vec![holder], src).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StorageUnavailable, "{e}");
    let e = copy(0, 10, vec![], src).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "a hole: {e}");
    let e = copy(1, 10, vec![], ROOT_INO).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "a directory: {e}");
}
