//! Typed socket addresses, so that a client's address, the destination a firewall
//! redirected and the proxy's own listening address cannot be passed for one another
//! (linkerd2-proxy's `Remote<ClientAddr>` and `OrigDstAddr` are the model).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The address a client connected from (the accepted socket's peer), and the policy its
/// certificate chose, when it presented one on `proxy.tls_listen` (`proxy.tls_client_ca`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    /// Chosen by the client's certificate, which wins over its address.
    pub certified: Option<crate::config::PolicyKey>,
}

/// The destination a redirected connection was addressed to before the firewall sent it
/// here (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// One of the proxy's own bound listening addresses (proxy, TLS, transparent, admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl ClientAddr {
    /// A client at `addr`, no certificate seen (yet).
    pub fn new(addr: SocketAddr) -> Self {
        ClientAddr {
            addr,
            certified: None,
        }
    }

    /// The client's IP address, an IPv4-mapped IPv6 one (a dual-stack listener) as IPv4.
    pub fn ip(self) -> IpAddr {
        self.addr.ip().to_canonical()
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
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

shown_as_socket_addr!(OrigDstAddr, ListenAddr);
