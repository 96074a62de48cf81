//! The tonic `PolicyStore` service (`proto/policy.proto`): Apply, Get, History, Watch.

mod policy_version;
mod service;

pub(crate) use service::PolicyStoreService;
