//! The forwarding proxy. A connection flows one way through these modules:
//!
//! ```text
//! workers, listen (accept, client ACL, limits)
//!   → conn (a forward-proxy connection: first head, then hyper; route)
//!       → connect (decide, dial, 200) → tunnel (inspect: sni / detect; relay)
//!       → http (decide per request, forward through pool)
//!   → transparent (redirected TLS and HTTP)
//! ```
//!
//! Beside that path, below every module on it:
//! - `refusal`: the one way to refuse (count, record, log, answer), and the counting of
//!   allowed requests;
//! - `state`: the live configuration (swapped on reload) and the proxy's judgement;
//! - `serve`: serving HTTP/1 requests on a stream with the proxy's bounds (listeners,
//!   tunnels and transparent HTTP alike);
//! - `plumbing`: connection slots, registration, the drain tracker and the stop signal;
//! - `handshake`, `sni`, `detect`, `head`, `host`: reading what a client sent;
//! - `dial` (the guarded dialler every upstream connection goes through), `pool`, `relay`;
//! - `respond`: the bytes of the proxy's own answers; `addr`: typed addresses; `error`.
//!
//! Listeners and the shutdown signal are passed in, so that tests bind port 0 and stop the
//! proxy cleanly.

pub mod activity;
pub mod addr;
mod conn;
mod connect;
pub mod detect;
pub mod dial;
pub mod error;
mod handshake;
pub mod head;
pub mod host;
mod http;
pub mod keepalive;
mod listen;
pub mod per_client;
mod plumbing;
pub mod pool;
mod refusal;
pub mod relay;
pub mod respond;
mod serve;
pub mod sni;
mod state;
pub mod tls;
pub mod transparent;
mod tunnel;
pub mod workers;

pub use addr::{ClientAddr, ListenAddr, OrigDstAddr};
pub use error::SetupError;
pub use listen::{Listener, Role, bind};
pub use plumbing::{TrackGuard, Tracker};
pub use state::{Live, Mode, ProxyConfig, Shared};
pub use workers::{Workers, run};
