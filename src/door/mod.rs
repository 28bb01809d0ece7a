//! The front door: listeners, first-byte sniffing, TLS, the RTMPT tunnel and the RTMPE layer.

pub mod admit;
pub mod fdlimit;
pub mod listener;
pub mod rtmpe;
pub mod rtmpt;
pub mod sniff;

pub use listener::{BindError, Door, DoorOptions};
