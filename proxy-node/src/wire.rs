//! Wire protocols spoken with clients and targets. Codecs are sans-I/O: they turn bytes into
//! frames and frames into bytes, and never touch a socket.

pub mod postgres;
