//! Typed socket addresses, so that a client's address, the destination a firewall
//! redirected and the proxy's own listening address cannot be passed for one another
//! (linkerd2-proxy's `Remote<ClientAddr>` and `OrigDstAddr` are the model).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The address a client connected from (the accepted socket's peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The destination a redirected connection was addressed to before the firewall sent it
/// here (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// One of the proxy's own bound listening addresses (proxy, TLS, transparent, admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl ClientAddr {
    /// The client's IP address, an IPv4-mapped IPv6 one (a dual-stack listener) as IPv4.
    pub fn ip(self) -> IpAddr {
        self.0.ip().to_canonical()
    }
}

macro_rules! shown_as_socket_addr {
    ($($t:ty),+) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )+};
}

shown_as_socket_addr!(ClientAddr, OrigDstAddr, ListenAddr);
