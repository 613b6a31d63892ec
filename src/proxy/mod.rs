//! The forwarding proxy. A connection flows one way through these modules:
//!
//! ```text
//! listen (accept, client ACL, limits) → conn (first head, hyper, routing)
//!   → connect (decide, dial, 200) → tunnel (inspect: sni / detect; relay)
//!   → http (decide per request, forward through pool)
//! ```
//!
//! with `admit` counting one decision per request and logging refusals beside it, `state`
//! holding the live configuration (swapped on reload) and the drain tracker, and `dial`
//! the guarded dialler every upstream connection goes through. Listeners and the shutdown
//! signal are passed in, so that tests bind port 0 and stop the proxy cleanly.

pub mod activity;
mod admit;
mod conn;
mod connect;
pub mod detect;
pub mod dial;
mod handshake;
pub mod head;
pub mod host;
mod http;
pub mod keepalive;
mod listen;
pub mod per_client;
pub mod pool;
pub mod relay;
pub mod respond;
pub mod sni;
mod state;
pub mod tls;
pub mod transparent;
mod tunnel;
pub mod workers;

pub(crate) use admit::{AllowCount, Judged, Seen};
pub(crate) use conn::serve_requests;
pub(crate) use listen::ConnHandles;
pub use listen::{Listener, Role, bind};
pub use state::{Live, Mode, ProxyConfig, Shared, TrackGuard, Tracker};
pub use workers::{Workers, run};
