//! The PostgreSQL v3 protocol: framing ([`frame`]) and the messages the proxy reads or writes
//! itself ([`messages`]). Everything else is relayed as opaque frames.

pub mod frame;
pub mod messages;

pub use frame::{Frame, FrameError, StartupFrame, decode_frame, decode_startup};
