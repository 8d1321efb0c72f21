use kache_oci::Digest;

/// Everything the store can refuse or fail with. The registry maps each variant onto the
/// OCI error code a client expects; nothing here knows about HTTP.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob unknown to this repository")]
    BlobUnknown,
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("repository unknown")]
    NameUnknown,
    #[error("manifest references blob {0} which this repository does not hold")]
    ManifestBlobUnknown(Digest),
    #[error("content digest is {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upload unknown or expired")]
    UploadUnknown,
    #[error("chunk starts at {got}, but the upload holds {expected} bytes")]
    RangeInvalid { expected: u64, got: u64 },
    #[error("content is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("content has {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// The client's body stream failed (disconnect, reset): nothing was stored.
    #[error("reading the request body failed: {0}")]
    Body(std::io::Error),
    /// The disk is full: nothing was kept, and the registry is evicting to make room.
    #[error("no space left in the store: {0}")]
    NoSpace(std::io::Error),
    #[error("storage I/O failed: {0}")]
    Io(std::io::Error),
    /// A garbage collection is already running; one runs at a time.
    #[error("a garbage collection is already running")]
    Busy,
    #[error("index failed: {0}")]
    Index(String),
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        if is_no_space(&e) {
            StoreError::NoSpace(e)
        } else {
            StoreError::Io(e)
        }
    }
}

/// ENOSPC, and EDQUOT (a quota is a full disk to whoever hits it).
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded
}

impl StoreError {
    /// The disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace(_))
    }

    pub(crate) fn index(e: impl std::fmt::Display) -> Self {
        StoreError::Index(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::index(e)
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
