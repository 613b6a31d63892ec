//! Upstream dialling: resolve once, guard every address, dial exactly what was checked.
//!
//! Every address is first put in its canonical form: an IPv6 address that carries an IPv4
//! one (IPv4-mapped, IPv4-translated, IPv4-compatible, NAT64, 6to4, Teredo) is checked as
//! that IPv4 address. Then, in this order: the proxy's own listening sockets (proxy, TLS
//! and admin listeners, on every local address) are refused whatever any setting says;
//! `[[deny]]` CIDR rules refuse the addresses inside them, resolved or literal;
//! `upstream.allow_cidrs` exempts networks from the guard; and the guard refuses loopback,
//! link-local (cloud metadata included), Azure's platform address 168.63.129.16,
//! unspecified, broadcast, multicast and reserved addresses. Private ranges pass only for
//! names the allowlist matched (Azure private endpoints resolve to them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;

use super::addr::{ListenAddr, OrigDstAddr};
use super::error::SetupError;
use crate::policy::{Host, PortSet, Target};
use crate::reason::ReasonCode;

/// Azure's platform address (wire server and DNS, RFC-less but documented by Azure as
/// "168.63.129.16"): on an NVA, a path to the VM's own platform identity and extensions.
pub const AZURE_PLATFORM: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);

/// How an address is treated by the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Public: dialled.
    Public,
    /// RFC 1918, CGNAT or ULA: dialled only for allowlisted names.
    Private,
    /// Never dialled unless exempted.
    Forbidden,
}

/// Classify an address, looking through IPv6 forms that embed an IPv4 address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    if ip.is_loopback()
        || ip == AZURE_PLATFORM
        || ip.is_link_local()
        || ip.is_unspecified()
        || o[0] == 0
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] >= 240
    {
        AddressClass::Forbidden
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    let metadata: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    if ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || ip == metadata
    {
        AddressClass::Forbidden
    } else if (s[0] & 0xfe00) == 0xfc00 {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

/// The address as the guard and the self check see it: an IPv6 address that carries an
/// IPv4 one becomes that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address an IPv6 address carries: mapped (`::ffff:0:0/96`), translated
/// (`::ffff:0:0:0/96`, RFC 2765), compatible, NAT64 (well-known and local-use), 6to4, and
/// Teredo (the client address).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(low); // IPv4-translated ::ffff:0:a.b.c.d
    }
    if s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(low); // IPv4-compatible ::a.b.c.d
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) {
        return Some(low); // NAT64
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        let o = low.octets();
        return Some(Ipv4Addr::new(!o[0], !o[1], !o[2], !o[3])); // Teredo client
    }
    None
}

/// Why an upstream could not be reached; each maps to a status and a `Proxy-Status` error.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("the name does not resolve: {0}")]
    Dns(String),
    #[error("the name resolves to no address")]
    NoAddress,
    #[error("every address of the destination is forbidden ({0})")]
    Forbidden(IpAddr),
    #[error("the destination is the proxy itself ({0})")]
    SelfConnection(SocketAddr),
    #[error("{0} is inside the [[deny]] entry {1}")]
    DenyRule(IpAddr, String),
    #[error("connecting timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Refused(std::io::Error),
    /// The upstream's TLS certificate did not verify (an inspected request).
    #[error("the upstream's TLS certificate did not verify: {0}")]
    Certificate(String),
}

impl DialError {
    /// The `Proxy-Status` error token (RFC 9209) and our own reason.
    pub fn proxy_status(&self) -> (&'static str, ReasonCode) {
        match self {
            DialError::Dns(_) => ("dns_error", ReasonCode::DnsFailed),
            DialError::NoAddress => ("dns_error", ReasonCode::NoAddress),
            DialError::Forbidden(_) | DialError::SelfConnection(_) => {
                ("destination_ip_prohibited", ReasonCode::ForbiddenAddress)
            }
            DialError::DenyRule(..) => ("destination_ip_prohibited", ReasonCode::DenyRule),
            DialError::Timeout(_) => ("connection_timeout", ReasonCode::DialTimeout),
            DialError::Refused(_) => ("connection_refused", ReasonCode::DialFailed),
            DialError::Certificate(_) => (
                "tls_certificate_error",
                ReasonCode::UpstreamCertificateInvalid,
            ),
        }
    }
}

/// The DNS resolver: hickory's asynchronous, caching resolver.
///
/// Chosen over the system's `getaddrinfo` because it keeps answers for their TTL (Azure
/// front ends use short TTLs, and a proxy asks for the same few names all day), needs no
/// blocking thread per look-up, and its name servers can be set, so that tests run the real
/// path against a responder on loopback. Names are looked up fully qualified, so that a
/// search domain can never turn an allowed name into another one.
#[derive(Clone)]
pub struct Resolver(hickory_resolver::TokioResolver);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// A resolver asking `name_servers` (UDP, TCP for long answers), or those of
    /// `/etc/resolv.conf` when the list is empty.
    pub fn new(name_servers: &[SocketAddr]) -> Result<Self, SetupError> {
        use hickory_resolver::config::{
            ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
        };
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let mut builder = if name_servers.is_empty() {
            hickory_resolver::TokioResolver::builder_tokio()
                .map_err(|e| SetupError::SystemDns(e.to_string()))?
        } else {
            let servers = name_servers
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            hickory_resolver::TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.cache_size = 4096;
        builder
            .build()
            .map(Resolver)
            .map_err(|e| SetupError::Resolver(e.to_string()))
    }

    /// Every address of `name`, with `port`.
    pub async fn lookup(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, DialError> {
        // Parsed as ASCII, not as IDNA: names that policy accepts (`x_y.example`, RFC 2181
        // §11) must resolve, so that policy and dialler agree.
        let fqdn = hickory_resolver::proto::rr::Name::from_ascii(format!("{name}."))
            .map_err(|e| DialError::Dns(e.to_string()))?;
        match self.0.lookup_ip(fqdn).await {
            Ok(found) => Ok(found.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
            Err(e) if e.is_no_records_found() => Err(DialError::NoAddress),
            Err(e) => Err(DialError::Dns(e.to_string())),
        }
    }
}

/// Dialling settings, fixed when the configuration is loaded.
#[derive(Debug, Clone, Default)]
pub struct DialConfig {
    pub connect_to: Vec<(String, SocketAddr)>,
    pub allow_cidrs: Vec<IpNet>,
    /// `[[deny]]` CIDR rules: network, ports, and the rule as shown.
    pub deny_cidrs: Vec<(IpNet, PortSet, String)>,
    pub deny_private: bool,
    pub timeout: Duration,
    /// The proxy's own listening sockets (proxy, TLS and admin listeners).
    pub own: Vec<ListenAddr>,
    /// `None` only in unit tests of the guard.
    pub resolver: Option<Resolver>,
}

impl DialConfig {
    /// Whether dialling `addr` (canonical) would connect the proxy to itself.
    fn is_self(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|&ListenAddr(own)| {
            if own.port() != addr.port() {
                return false;
            }
            let own_ip = canonical(own.ip());
            if own_ip == addr.ip() {
                return true;
            }
            // A wildcard listener answers on every local address (a dual-stack `[::]` one
            // on IPv4 addresses too): ask the kernel whether `addr` is local.
            own_ip.is_unspecified() && is_local_address(addr.ip())
        })
    }

    /// Whether a connection to `addr` would reach the proxy itself: one of its listeners
    /// (on any local address for a wildcard one), or the unspecified address.
    pub fn is_proxy_itself(&self, OrigDstAddr(addr): OrigDstAddr) -> bool {
        let ip = canonical(addr.ip());
        ip.is_unspecified() || self.is_self(SocketAddr::new(ip, addr.port()))
    }

    /// Check one address against the self check, the deny rules and the guard.
    pub fn check(&self, addr: SocketAddr, name_allowlisted: bool) -> Result<(), DialError> {
        let ip = canonical(addr.ip());
        // The unspecified address is never a destination: the kernel connects it to this
        // host (0.0.0.0 to 127.0.0.1, :: to ::1), whatever allow_cidrs say.
        if ip.is_unspecified() || self.is_self(SocketAddr::new(ip, addr.port())) {
            return Err(DialError::SelfConnection(addr));
        }
        if let Some((_, _, rule)) = self.deny_cidrs.iter().find(|(net, ports, _)| {
            ports.contains(addr.port()) && (net.contains(&ip) || net.contains(&addr.ip()))
        }) {
            return Err(DialError::DenyRule(addr.ip(), rule.clone()));
        }
        if self.allow_cidrs.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match classify(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Private if name_allowlisted && !self.deny_private => Ok(()),
            _ => Err(DialError::Forbidden(addr.ip())),
        }
    }
}

fn is_local_address(ip: IpAddr) -> bool {
    // An IPv6 link-local address cannot be asked about without its interface: count it
    // as local (fail closed; the guard refuses link-local destinations anyway).
    let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
    if ip.is_loopback() || ip.is_unspecified() || link_local {
        return true;
    }
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| {
            s.connect((ip, 9))?;
            s.local_addr()
        })
        .map(|local| local.ip() == ip)
        .unwrap_or(false)
}

/// Resolve (once), guard, and connect. `name_allowlisted` says whether an allow rule
/// matched the name (audit-mode passes do not count), which private ranges require.
pub async fn dial(
    target: &Target,
    name_allowlisted: bool,
    cfg: &DialConfig,
) -> Result<(TcpStream, SocketAddr), DialError> {
    dial_preferring(target, None, name_allowlisted, cfg).await
}

/// As [`dial`]; when `prefer` is among the addresses the target resolves to (and passes
/// the guard), only it is dialled. For `transparent.dial = "original_if_resolved"`: the
/// address the client chose is used only when the name really has it.
pub async fn dial_preferring(
    target: &Target,
    prefer: Option<std::net::IpAddr>,
    name_allowlisted: bool,
    cfg: &DialConfig,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let key = target.to_string();
    let addrs: Vec<SocketAddr> =
        if let Some((_, to)) = cfg.connect_to.iter().find(|(k, _)| *k == key) {
            vec![*to]
        } else {
            match target.host {
                Host::Ip(ip) => vec![SocketAddr::new(ip, target.port)],
                Host::Name(name) => {
                    let Some(resolver) = &cfg.resolver else {
                        return Err(DialError::Dns("no resolver configured".into()));
                    };
                    let lookup = resolver.lookup(name.as_str(), target.port);
                    match tokio::time::timeout(cfg.timeout, lookup).await {
                        Err(_) => return Err(DialError::Timeout(cfg.timeout)),
                        Ok(r) => r?,
                    }
                }
            }
        };
    if addrs.is_empty() {
        return Err(DialError::NoAddress);
    }
    let mut refusal = None;
    let mut allowed = Vec::with_capacity(addrs.len());
    for a in addrs {
        match cfg.check(a, name_allowlisted) {
            Ok(()) => allowed.push(a),
            Err(e) => refusal = Some(e),
        }
    }
    if allowed.is_empty() {
        return Err(refusal.unwrap_or(DialError::NoAddress));
    }
    if let Some(p) = prefer.map(canonical)
        && let Some(a) = allowed.iter().find(|a| canonical(a.ip()) == p)
    {
        return race(vec![*a], cfg.timeout).await;
    }
    race(interleave(allowed), cfg.timeout).await
}

/// RFC 8305 order: families alternate, IPv6 first.
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let (v6, v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv6);
    let mut order = Vec::with_capacity(v6.len() + v4.len());
    for i in 0..v6.len().max(v4.len()) {
        order.extend(v6.get(i));
        order.extend(v4.get(i));
    }
    order
}

/// RFC 8305 section 5's "Connection Attempt Delay".
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

async fn attempt(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok((s, addr))
        }
        Ok(Err(e)) => Err(DialError::Refused(e)),
        Err(_) => Err(DialError::Timeout(timeout)),
    }
}

/// Happy Eyeballs (RFC 8305): start the next attempt when the previous one fails or after
/// [`ATTEMPT_DELAY`], whichever comes first; the first connection wins and the others are
/// dropped. Every attempt has its own timeout.
async fn race(
    order: Vec<SocketAddr>,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    if let [only] = order[..] {
        return attempt(only, timeout).await;
    }
    let mut pending = order.into_iter().peekable();
    let mut running = tokio::task::JoinSet::new();
    let mut last = None;
    loop {
        if let Some(addr) = pending.next() {
            running.spawn(attempt(addr, timeout));
        }
        if running.is_empty() {
            return Err(last.unwrap_or(DialError::NoAddress));
        }
        let more = pending.peek().is_some();
        tokio::select! {
            done = running.join_next() => match done {
                Some(Ok(Ok(won))) => return Ok(won), // dropping the set aborts the rest
                Some(Ok(Err(e))) => last = Some(e),
                _ => {}
            },
            _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn happy_eyeballs_moves_past_a_refusing_address() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = live.local_addr().unwrap();
        // A port with nothing listening refuses at once.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (s, addr) = race(vec![closed, good], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, good);
        drop(s);
        let err = race(vec![closed, closed], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Refused(_)), "{err}");
    }

    #[test]
    fn families_alternate_ipv6_first() {
        let a: Vec<SocketAddr> = ["1.1.1.1:1", "2.2.2.2:1", "[2001:db8::1]:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let order = interleave(a);
        assert!(order[0].is_ipv6() && order[1].is_ipv4() && order[2].is_ipv4());
    }

    fn class(s: &str) -> AddressClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn guard_classes() {
        use AddressClass::*;
        let cases = [
            ("127.0.0.1", Forbidden),
            ("169.254.169.254", Forbidden),
            ("0.0.0.0", Forbidden),
            ("255.255.255.255", Forbidden),
            ("224.0.0.1", Forbidden),
            ("240.0.0.1", Forbidden),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("20.1.2.3", Public),
            ("::1", Forbidden),
            ("::", Forbidden),
            ("fe80::1", Forbidden),
            ("ff02::1", Forbidden),
            ("fd00:ec2::254", Forbidden),
            ("fd12::1", Private),
            ("2001:db8::1", Public),
            ("::ffff:127.0.0.1", Forbidden),
            ("::ffff:169.254.169.254", Forbidden),
            ("::127.0.0.1", Forbidden),
            ("64:ff9b::7f00:1", Forbidden),
            ("64:ff9b::a9fe:a9fe", Forbidden),
            ("2002:7f00:1::", Forbidden),
            ("2002:a00:1::", Private),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", Forbidden), // Teredo client 127.0.0.1
            ("::ffff:20.1.2.3", Public),
            ("168.63.129.16", Forbidden),
            ("::ffff:168.63.129.16", Forbidden),
            ("::ffff:0:127.0.0.1", Forbidden),
            ("::ffff:0:a9fe:a9fe", Forbidden),
            ("::ffff:0:14.1.2.3", Public),
        ];
        for (ip, want) in cases {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn private_ranges_need_an_allowlisted_name_and_allow_cidrs_exempt() {
        let mut cfg = DialConfig::default();
        let private: SocketAddr = "10.0.0.5:443".parse().unwrap();
        assert!(cfg.check(private, true).is_ok());
        assert!(cfg.check(private, false).is_err());
        cfg.deny_private = true;
        assert!(cfg.check(private, true).is_err());
        let lo: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(cfg.check(lo, true).is_err());
        cfg.allow_cidrs.push("127.0.0.1/32".parse().unwrap());
        assert!(cfg.check(lo, true).is_ok());
        cfg.own.push(ListenAddr("127.0.0.1:9".parse().unwrap()));
        assert!(matches!(
            cfg.check(lo, true),
            Err(DialError::SelfConnection(_))
        ));
        cfg.own = vec![ListenAddr("0.0.0.0:9".parse().unwrap())];
        assert!(matches!(
            cfg.check(lo, true),
            Err(DialError::SelfConnection(_))
        ));
        // Every IPv6 form of the proxy's own address is the proxy, whatever allow_cidrs say.
        cfg.own = vec![ListenAddr("127.0.0.1:9".parse().unwrap())];
        cfg.allow_cidrs = vec!["::/0".parse().unwrap(), "0.0.0.0/0".parse().unwrap()];
        for form in [
            "[::ffff:127.0.0.1]:9",
            "[::ffff:0:127.0.0.1]:9",
            "[::127.0.0.1]:9",
            "[64:ff9b::7f00:1]:9",
        ] {
            let a: SocketAddr = form.parse().unwrap();
            assert!(
                matches!(cfg.check(a, true), Err(DialError::SelfConnection(_))),
                "{form}"
            );
        }
        cfg.own = vec![ListenAddr("[::]:9".parse().unwrap())];
        assert!(matches!(
            cfg.check(lo, true),
            Err(DialError::SelfConnection(_))
        ));
    }

    #[test]
    fn deny_cidrs_apply_to_every_form_of_an_address() {
        let cfg = DialConfig {
            deny_cidrs: vec![(
                "127.0.0.1/32".parse().unwrap(),
                PortSet::any(),
                "127.0.0.1/32 port any".into(),
            )],
            allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
            ..DialConfig::default()
        };
        for form in [
            "127.0.0.1:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:0:127.0.0.1]:80",
        ] {
            let a: SocketAddr = form.parse().unwrap();
            assert!(
                matches!(cfg.check(a, true), Err(DialError::DenyRule(..))),
                "{form}"
            );
        }
        assert!(cfg.check("127.0.0.2:80".parse().unwrap(), true).is_ok());
    }
}
