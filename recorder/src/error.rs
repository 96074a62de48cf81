//! Errors of the recorder, its storage setup and the audit readers.

use object_store::path::Path;
use uuid::Uuid;

/// Opening the object store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("creating recordings directory {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring object store for {url}")]
    Build {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// The recorder loop.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("creating the recorder's durable consumer")]
    Consumer(#[source] eventbus::BusError),
    #[error("encoding a chunk of session {session}")]
    Encode {
        session: Uuid,
        #[source]
        source: ChunkError,
    },
    #[error("reading the signing key {path}")]
    SigningKey {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key {path}: expected 64 hex digits (an Ed25519 seed)")]
    SigningKeyFormat { path: String },
}

/// Encoding or decoding one chunk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("encoding MessagePack")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding MessagePack")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("compressing")]
    Compress(#[source] std::io::Error),
    #[error("decompressing")]
    Decompress(#[source] std::io::Error),
}

/// Writing the Parquet index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("writing Parquet")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// Reading recordings back.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no recording of session {0}")]
    NotFound(Uuid),
    #[error("listing recordings")]
    List(#[source] object_store::Error),
    #[error("reading chunk {path}")]
    Read {
        path: Path,
        #[source]
        source: object_store::Error,
    },
    #[error("decoding chunk {path}")]
    Decode {
        path: Path,
        #[source]
        source: ChunkError,
    },
    /// A reader found the session's chain broken: it shows nothing rather than what was not
    /// recorded.
    #[error("session {session} was tampered with ({problem}): run `airlock audit verify {session}`")]
    Tampered { session: Uuid, problem: String },
    #[error("public key: expected 64 hex digits (an Ed25519 public key)")]
    PublicKey,
}
