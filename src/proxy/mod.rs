//! The forwarding proxy. A connection flows one way, top to bottom:
//!
//! ```text
//! accept/      workers, listen (accept, client ACL, limits), conn (first head, router)
//!   ├─ connect/    open (decide, dial, 200) → tunnel (inspect: handshake, sni, detect) → relay
//!   ├─ forward/    http (decide per request, forward through the pool), host
//!   └─ transparent/  tls (connect's handshake, then relay), http (forward's http)
//! ```
//!
//! The files at this level are what those entry points share, below all of them: `refusal`
//! (the one way to refuse: count, record, log, answer; and the counting of allowed
//! requests), `state` (the live configuration, swapped on reload, and the proxy's
//! judgement), `serve` (HTTP/1 requests on a stream with the proxy's bounds), `plumbing`
//! (connection slots, registration, the drain tracker, the stop signal) and `per_client`,
//! `respond` (the bytes of the proxy's own answers), `head` and `keepalive`, `dial` (the
//! guarded dialler every upstream connection goes through) and `pool`, `activity`, `tls`,
//! typed addresses (`addr`) and set-up errors (`error`). None of them imports a folder.
//!
//! Listeners and the shutdown signal are passed in, so that tests bind port 0 and stop the
//! proxy cleanly.

pub mod accept;
pub mod activity;
pub mod addr;
pub mod connect;
pub mod dial;
pub mod error;
pub mod forward;
pub mod head;
pub mod inspect;
pub mod keepalive;
pub mod per_client;
mod plumbing;
pub mod pool;
mod refusal;
pub mod relay;
pub mod respond;
mod serve;
mod state;
pub mod tls;
pub mod transparent;

pub use accept::listen::{Listener, Role, bind};
pub use accept::workers::{Workers, run};
pub use addr::{ClientAddr, ListenAddr, OrigDstAddr};
pub use error::SetupError;
pub use plumbing::{TrackGuard, Tracker};
pub use state::{Live, Mode, ProxyConfig, Shared};
