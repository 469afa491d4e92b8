//! BFD (RFC 5880/5881): single-hop, asynchronous mode, one session per BGP
//! session. `packet` and `fsm` are pure; `io` does the sockets and timers.
pub mod fsm;
pub mod io;
pub mod packet;

pub use io::{BfdPeer, BfdStatus};
