//! dfs-mount: the cluster as a POSIX file system through FUSE. Metadata goes to the
//! metaserver, file bytes straight to and from the storage daemons.

pub mod attrs;
pub mod dir;
pub mod error;
pub mod errseq;
pub mod fuse;
pub mod inode;
pub mod kernel;
pub mod known_dirs;
pub mod meta_client;
pub mod ops;
pub mod storage_pool;
pub mod xattrs;
