//! The tonic services of a node: `PolicyStore` (`proto/policy.proto`: Apply, Get, History,
//! Watch), and from `proto/raft.proto` the `Raft` RPCs between nodes and the `PolicyStoreAdmin` API.

mod admin;
mod policy_version;
mod raft;
mod service;

pub(crate) use admin::AdminService;
pub(crate) use raft::RaftService;
pub(crate) use service::PolicyStoreService;
