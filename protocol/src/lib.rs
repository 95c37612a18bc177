//! txmq-protocol: the single source of truth for txmq's wire format.
//!
//! A pure codec with no I/O. Start with [`frame`] (what travels on a
//! connection), then [`request`] (every request kind and its response),
//! [`message`] (the user's message) and [`error`] (numbered error codes).
//!
//! On the wire a frame is a 4-byte big-endian length followed by a
//! MessagePack body ([`codec::FrameCodec`]).

#![warn(missing_docs)]

pub mod codec;
pub mod dashboard;
pub mod error;
mod fast;
pub mod frame;
pub mod gather;
pub mod lookup;
pub mod message;
pub mod ops;
pub mod request;

pub use codec::{FrameCodec, DEFAULT_MAX_FRAME_LEN};
pub use dashboard::*;
pub use error::{ErrorCode, WireError};
pub use frame::{Frame, Hello, HelloOk, Role, PROTOCOL_VERSION};
pub use lookup::*;
pub use message::{deliver_at_after, fnv1a, now_millis, tag_hash, Message, MsgId, StoredMessage};
pub use ops::*;
pub use request::*;
