//! `CONNECT` and tunnels: the request decided, dialled and answered (`open`), then what the
//! tunnel carries inspected (`tunnel`: TLS through `handshake` and `sni`, HTTP/1 handed to
//! forwarding, anything else refused after `detect`) and relayed (`super::relay`).

pub mod detect;
pub(crate) mod handshake;
pub(super) mod open;
pub mod sni;
pub(super) mod tunnel;
