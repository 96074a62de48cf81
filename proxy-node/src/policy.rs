//! Policy: what a statement does ([`classify`], cached per node by [`cache`]) and what the rules
//! say about it ([`evaluate`]).

pub mod cache;
pub mod classify;
pub mod evaluate;
pub mod scan;

pub use classify::{
    Access, AttributeCall, Classification, FunctionRef, SessionEffect, TableName, classify,
    is_denied_builtin, is_read_only_builtin,
};
pub use evaluate::{SessionFacts, Verdict, evaluate, evaluate_with_grants, may_write};
