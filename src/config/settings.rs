//! The typed settings, one declaration per key: its field, type, default, environment form
//! and reload behaviour. Closed settings are enums, addresses and networks are parsed, and
//! durations are [`Duration`]s, so nothing after load compares or parses a string.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::{Value, ValueKind};
use ipnet::IpNet;
use serde::Deserialize;

use super::read::{Bad, Env, Key, Reader, Reload, Setting, items, shown};
use crate::catalog::{Cloud, PortItem};
use crate::policy::{Target, TlsPathRules};

/// A closed setting: an enum with its configuration spellings, parsed at load with an
/// error that lists the accepted values.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every value, in the order the documentation lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The configuration spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Setting for $name {
            fn from_value(v: &Value) -> Result<Self, Bad> {
                let given = String::from_value(v)?;
                $name::ALL
                    .iter()
                    .copied()
                    .find(|c| c.as_str() == given)
                    .ok_or_else(|| {
                        let names: Vec<String> =
                            $name::ALL.iter().map(|c| format!("\"{}\"", c.as_str())).collect();
                        Bad::new("not an accepted value", format!("use {}", names.join(" or ")))
                    })
            }
        }
    };
}

choice! {
    /// `proxy.mode`.
    Mode {
        /// Refuse what the policy denies.
        Enforce = "enforce",
        /// Let policy denials through, logged as `would_deny`.
        Audit = "audit",
    }
}

choice! {
    /// `proxy.sni_missing`: what a well-formed ClientHello without a server name gets.
    SniMissing {
        Deny = "deny",
        Allow = "allow",
    }
}

choice! {
    /// `proxy.ech`: what a ClientHello carrying an encrypted one (ECH, RFC 9849) gets. Its
    /// outer server name is not where a front end that accepts ECH sends it.
    Ech {
        /// Refused (`tls_ech_present`), in every mode.
        Deny = "deny",
        /// Decided on the outer server name, as any hello.
        Allow = "allow",
    }
}

choice! {
    /// `proxy.forwarded_headers`: what happens to the fields with which a client could steer
    /// a front end that routes on them (`X-Forwarded-Host`, `Forwarded`, ...) to another
    /// tenant behind an allowed name.
    ForwardedHeaders {
        /// Removed from every forwarded request.
        Strip = "strip",
        /// Passed on as the client sent them.
        Keep = "keep",
    }
}

choice! {
    /// `catalog.service_tags_nameless_tls`: what an address on a TLS port gets when only a
    /// catalog (service tag) prefix allows it.
    NamelessTls {
        /// Refused (`service_tag_without_name`); only an operator `[[allow]]` CIDR rule
        /// allows such an address.
        Deny = "deny",
        /// Allowed by the prefix: any tenant behind it can be reached.
        Allow = "allow",
    }
}

choice! {
    /// `upstream.private_ranges`.
    PrivateRanges {
        /// RFC 1918, CGNAT and ULA addresses only for names an allow rule matched.
        AllowMatched = "allow_matched",
        Deny = "deny",
    }
}

choice! {
    /// `transparent.mode`: how redirected connections arrive. Only `redirect` (nftables or
    /// iptables `REDIRECT`, the original destination read with `SO_ORIGINAL_DST`) is built;
    /// `tproxy` is not.
    TransparentMode {
        Redirect = "redirect",
    }
}

choice! {
    /// `transparent.dial`: which address a redirected TLS connection is dialled at.
    TransparentDial {
        /// The addresses its server name resolves to: never one the client chose.
        Name = "name",
        /// The original destination when it is among the name's resolved addresses.
        OriginalIfResolved = "original_if_resolved",
    }
}

choice! {
    /// `log.level`.
    LogLevel {
        Error = "error",
        Warn = "warn",
        Info = "info",
        Debug = "debug",
        Trace = "trace",
    }
}

choice! {
    /// `log.format`.
    LogFormat {
        /// One JSON object per line.
        Json = "json",
        Text = "text",
    }
}

impl Setting for TlsPathRules {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        match String::from_value(v)?.as_str() {
            "widen" => Ok(TlsPathRules::Widen),
            "deny" => Ok(TlsPathRules::Deny),
            "inspect" => Ok(TlsPathRules::Inspect),
            _ => Err(Bad::new(
                "not an accepted value",
                "use \"widen\" (allow the whole host over TLS), \"deny\" or \"inspect\" (enforce the path inside the inspected tunnel; needs inspect.ca_cert)",
            )),
        }
    }
}

impl Setting for Cloud {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        let given = String::from_value(v)?.to_ascii_lowercase();
        Cloud::from_name(&given).ok_or_else(|| {
            let names = Cloud::ALL.map(Cloud::name);
            Bad::new(
                "not a cloud this catalog covers",
                format!("use one of {}", names.join(", ")),
            )
        })
    }
}

/// A DNS server written as `ip`, `ip:port` or `[v6]:port`; port 53 when left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServer(pub SocketAddr);

impl Setting for Vec<NameServer> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        items(v)
            .into_iter()
            .map(|item| {
                let s = String::from_value(item)?;
                super::parse_name_server(&s).map(NameServer).ok_or_else(|| {
                    Bad::new(
                        format!("{} is not a name server address", shown(item)),
                        "write an address, optionally with a port: \"10.0.0.2\" or \"127.0.0.1:5353\"",
                    )
                })
            })
            .collect()
    }
}

/// `admin.listen`: an address, or `""` for no admin listener.
impl Setting for Option<SocketAddr> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        let s = String::from_value(v)?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| {
            Bad::new(
                "not an address:port",
                "write for example \"127.0.0.1:9464\", or \"\" for no admin listener",
            )
        })
    }
}

/// `upstream.connect_to`: `"host:port" = "address:port"` pins, like curl's `--connect-to`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectTo(pub Vec<(Target, SocketAddr)>);

impl Setting for ConnectTo {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        let ValueKind::Table(t) = &v.kind else {
            return Err(Bad::new(
                "expected a table",
                "write connect_to = { \"host:port\" = \"address:port\" } in the file",
            ));
        };
        t.iter()
            .map(|(from, to)| {
                let target = Target::parse(from).ok();
                let addr = String::from_value(to).ok().and_then(|s| s.parse().ok());
                match (target, addr) {
                    (Some(t), Some(a)) => Ok((t, a)),
                    _ => Err(Bad::new(
                        format!(
                            "{from:?} = {} is not a \"host:port\" = \"address:port\" pair",
                            shown(to)
                        ),
                        "write for example \"login.microsoftonline.com:443\" = \"127.0.0.1:18443\"",
                    )),
                }
            })
            .collect::<Result<_, _>>()
            .map(ConnectTo)
    }
}

/// `catalog.narrow`: wildcard patterns of the rendered rule set, each with the names it may
/// still allow, as written (checked against the rules when the policy is built).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Narrow(pub Vec<(String, Vec<String>)>);

impl Setting for Narrow {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        let ValueKind::Table(t) = &v.kind else {
            return Err(Bad::new(
                "expected a table",
                "write [catalog.narrow] with lines such as \"*.blob.core.windows.net\" = [\"amlstore.blob.core.windows.net\"]",
            ));
        };
        let mut out: Vec<(String, Vec<String>)> = t
            .iter()
            .map(|(pattern, names)| {
                Vec::<String>::from_value(names)
                    .map(|n| (pattern.clone(), n))
                    .map_err(|_| {
                        Bad::new(
                            format!("{pattern:?} = {} is not a list of names", shown(names)),
                            "write \"*.blob.core.windows.net\" = [\"amlstore.blob.core.windows.net\"]",
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        // The table's order is the file reader's; messages and output follow the text.
        out.sort();
        Ok(Narrow(out))
    }
}

/// Declares a settings section: a struct with one field per key, its defaults, its keys
/// (name, environment form, reload behaviour), and how it is read.
macro_rules! section {
    (
        $(#[$doc:meta])*
        $name:ident = $prefix:literal {
            $(
                $(#[$fdoc:meta])*
                $field:ident : $ty:ty = $default:expr ; $env:ident, $reload:ident ;
            )*
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fdoc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        impl $name {
            /// The section's keys.
            pub const KEYS: &'static [Key] = &[
                $( Key {
                    name: concat!($prefix, ".", stringify!($field)),
                    env: Env::$env,
                    reload: Reload::$reload,
                }, )*
            ];

            pub(super) fn read(r: &mut Reader<'_>) -> Self {
                let d = Self::default();
                $name {
                    $( $field: r.read(concat!($prefix, ".", stringify!($field)), d.$field), )*
                }
            }

            /// Each key with its value as shown in messages.
            fn shown(&self, out: &mut Vec<(&'static str, String)>) {
                $( out.push((concat!($prefix, ".", stringify!($field)), format!("{:?}", self.$field))); )*
            }
        }
    };
}

section! {
    /// The `[catalog]` section: which catalog, cloud, placeholders and optional parts.
    CatalogSettings = "catalog" {
        /// `public`, `usgov` or `china`.
        cloud: Cloud = Cloud::Public; Scalar, Live;
        /// An embedded revision (`2021-11`, `2026-03`); the newest when unset.
        revision: Option<String> = None; Scalar, Live;
        /// Fills `<region>` (an Azure region's programmatic name, normalised at check).
        region: Option<String> = None; Scalar, Live;
        /// Fills `<storage>`.
        storage_account: Option<String> = None; Scalar, Live;
        /// Fills `<acr>`.
        container_registry: Option<String> = None; Scalar, Live;
        /// Optional parts by name, or `["all"]`; by default the field addition
        /// `pip_downloads`, which every `pip install` from the default index needs.
        features: Vec<String> = vec!["pip_downloads".to_owned()]; List, Live;
        /// A catalog file to read instead of the embedded one.
        file: Option<PathBuf> = None; Scalar, Live;
        /// A Service Tags file: outbound TCP service-tag entries become CIDR rules.
        service_tags_file: Option<PathBuf> = None; Scalar, Live;
        /// Files Azure produced for one workspace (its outbound network dependencies, its
        /// managed network's outbound rules): their rules are added.
        import: Vec<PathBuf> = Vec::new(); List, Live;
        /// Wildcard patterns narrowed to the names they may still allow.
        narrow: Narrow = Narrow::default(); FileOnly, Live;
        /// Whether a service tag's (or other catalog) prefix may allow an address on a
        /// port in `proxy.tls_ports`, where no server name says which tenant is meant.
        service_tags_nameless_tls: NamelessTls = NamelessTls::Deny; Scalar, Live;
    }
}

choice! {
    /// `policy.unmatched_clients`: what serves a client no `[[client_policy]]` claims.
    UnmatchedClients {
        /// The default policy (the top-level `[catalog]`, `[[allow]]` and `proxy.mode`).
        Default = "default",
        /// Refused (`no_policy_for_client`).
        Refuse = "refuse",
    }
}

section! {
    /// The `[policy]` section.
    PolicySettings = "policy" {
        /// What path rules do when the path is hidden by TLS.
        tls_path_rules: TlsPathRules = TlsPathRules::Widen; Scalar, Live;
        /// What serves a client that no `[[client_policy]]` claims: the default policy,
        /// or a refusal.
        unmatched_clients: UnmatchedClients = UnmatchedClients::Default; Scalar, Live;
    }
}

section! {
    /// The `[inspect]` section: selective TLS inspection (off unless `ca_cert` is set). The
    /// CA's files are read and checked when the configuration is compiled, not here, so
    /// that `aml-egress ca init` can read the rest before any CA exists.
    InspectSettings = "inspect" {
        /// PEM certificate of the CA that signs the inspected tunnels' leaf certificates.
        ca_cert: Option<PathBuf> = None; Scalar, Live;
        /// PEM (PKCS#8) private key of that CA: its owner's alone (0600), or root's and its
        /// group's (0640, a Kubernetes Secret with fsGroup); never logged nor printed.
        ca_key: Option<PathBuf> = None; Scalar, Live;
        /// Host patterns (rule syntax, no path) whose allowed tunnels are inspected even
        /// without a path rule.
        hosts: Vec<String> = Vec::new(); List, Live;
        /// Host patterns never inspected (clients that pin certificates).
        bypass: Vec<String> = Vec::new(); List, Live;
        /// PEM trust anchors for verifying upstreams, added to the system's store.
        upstream_ca_file: Option<PathBuf> = None; Scalar, Live;
        /// Minted leaf certificates kept; the least recently used is evicted.
        max_cached_certs: usize = 10_000; Scalar, Live;
    }
}

section! {
    /// The `[proxy]` section: listeners, mode, who may connect, limits and tunnels.
    ProxySettings = "proxy" {
        /// Addresses to listen on.
        listen: Vec<SocketAddr> = vec![SocketAddr::from(([127, 0, 0, 1], 3128))]; List, Restart;
        /// Enforce the policy or only log what it would deny.
        mode: Mode = Mode::Enforce; Scalar, Live;
        /// Client networks allowed to use the proxy.
        allow_clients: Vec<IpNet> = [
            "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
            "100.64.0.0/10", "fc00::/7",
        ]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect(); List, Live;
        /// Concurrent client connections; more are answered 503 at once.
        max_connections: usize = 4096; Scalar, Live;
        /// Concurrent connections from one client address (IPv6 by /64); `0`: no limit.
        max_connections_per_client: usize = 1024; Scalar, Live;
        /// Largest request head accepted (bytes); larger heads get 431.
        max_header_bytes: usize = 16 * 1024; Scalar, Live;
        /// Time a client has to send a whole request head; slower ones get 408.
        header_timeout_secs: Duration = Duration::from_secs(10); Scalar, Live;
        /// Silence after which a tunnel or keep-alive connection is closed.
        idle_timeout_secs: Duration = Duration::from_secs(300); Scalar, Live;
        /// Time open tunnels and requests get to finish after SIGTERM/SIGINT.
        grace_period_secs: Duration = Duration::from_secs(30); Scalar, Live;
        /// After SIGTERM, time `/readyz` says 503 while the listeners still accept, so that a
        /// load balancer sees the instance go before its connections are refused.
        shutdown_delay_secs: Duration = Duration::ZERO; Scalar, Live;
        /// Ports whose tunnels must start with a ClientHello naming an allowed host.
        tls_ports: Vec<u16> = vec![443]; List, Live;
        /// Ports whose tunnels are relayed without inspection.
        opaque_ports: Vec<u16> = Vec::new(); List, Live;
        /// What a well-formed ClientHello without a server name gets.
        sni_missing: SniMissing = SniMissing::Deny; Scalar, Live;
        /// What a ClientHello carrying an encrypted one (ECH) gets.
        ech: Ech = Ech::Deny; Scalar, Live;
        /// Time a tunnel's client has to send its whole ClientHello (or its first bytes).
        sni_timeout_secs: Duration = Duration::from_secs(10); Scalar, Live;
        /// Addresses where clients reach the proxy over TLS.
        tls_listen: Vec<SocketAddr> = Vec::new(); List, Restart;
        /// PEM certificate chain for the TLS listeners.
        tls_cert: Option<PathBuf> = None; Scalar, Live;
        /// PEM private key (PKCS#8, PKCS#1 or SEC1) for the TLS listeners.
        tls_key: Option<PathBuf> = None; Scalar, Live;
        /// PEM certificates of the CA that signs client certificates: when set, clients of
        /// `proxy.tls_listen` must present one, whose names choose a `[[client_policy]]`.
        tls_client_ca: Option<PathBuf> = None; Scalar, Live;
        /// Add `Via: 1.1 aml-egress` to forwarded requests and responses.
        via: bool = true; Scalar, Live;
        /// Remove (`strip`) or pass on (`keep`) the forwarding fields of forwarded requests.
        forwarded_headers: ForwardedHeaders = ForwardedHeaders::Strip; Scalar, Live;
        /// Threads serving connections, each with its own socket on every listener
        /// (`SO_REUSEPORT`); `0`: one per CPU the process may run on.
        workers: usize = 0; Scalar, Restart;
    }
}

section! {
    /// The `[upstream]` section: how destinations are dialled.
    UpstreamSettings = "upstream" {
        /// `"host:port" = "addr:port"` pins, like curl's `--connect-to`.
        connect_to: ConnectTo = ConnectTo::default(); FileOnly, Live;
        /// Networks the address guard lets through (loopback, link-local, ...).
        allow_cidrs: Vec<IpNet> = Vec::new(); List, Live;
        /// Per connection attempt, and for the name look-up.
        dial_timeout_secs: Duration = Duration::from_secs(10); Scalar, Live;
        /// Private ranges only for names that matched the allowlist, or never.
        private_ranges: PrivateRanges = PrivateRanges::AllowMatched; Scalar, Live;
        /// DNS servers; empty means those of `/etc/resolv.conf`.
        name_servers: Vec<NameServer> = Vec::new(); List, Live;
    }
}

section! {
    /// The `[transparent]` section: listeners for connections redirected to this host by a
    /// network virtual appliance's firewall (off unless a listener is set).
    TransparentSettings = "transparent" {
        /// Where redirected TLS arrives; decided on the ClientHello's server name.
        tls_listen: Vec<SocketAddr> = Vec::new(); List, Restart;
        /// Where redirected plain HTTP arrives; decided on `Host` and the path.
        http_listen: Vec<SocketAddr> = Vec::new(); List, Restart;
        /// How connections are redirected.
        mode: TransparentMode = TransparentMode::Redirect; Scalar, Restart;
        /// Which address a redirected TLS connection is dialled at.
        dial: TransparentDial = TransparentDial::Name; Scalar, Live;
    }
}

section! {
    /// The `[admin]` section: the listener for metrics, health and the denied list.
    AdminSettings = "admin" {
        /// `host:port`, or `None` (`""`) to serve no admin endpoints.
        listen: Option<SocketAddr> = Some(SocketAddr::from(([127, 0, 0, 1], 9464))); Scalar, Restart;
        /// A file holding the bearer token; required off loopback.
        token_file: Option<PathBuf> = None; Scalar, Restart;
    }
}

section! {
    /// The `[metrics]` section.
    MetricsSettings = "metrics" {
        /// Distinct denied `host:port` pairs with their own series (and in `/denied`).
        max_denied_targets: usize = 1000; Scalar, Live;
        /// Distinct names allowed under wildcard rules kept (in `/allowed`, and counted by
        /// `aml_egress_wildcard_names`); the least recently seen are evicted.
        max_allowed_names: usize = 1000; Scalar, Live;
    }
}

section! {
    /// The `[log]` section.
    LogSettings = "log" {
        /// The level (`AML_EGRESS_LOG` takes precedence).
        level: LogLevel = LogLevel::Info; Scalar, Restart;
        /// JSON lines or text.
        format: LogFormat = LogFormat::Json; Scalar, Restart;
        /// Denial lines per target (`host:port`) per minute; more are counted, not written.
        denied_lines_per_minute: u32 = 10; Scalar, Live;
    }
}

section! {
    /// The `[reload]` section.
    ReloadSettings = "reload" {
        /// Time between looks at the config file (and the files it names); zero turns the
        /// watch off (SIGHUP still reloads).
        watch_interval_secs: Duration = Duration::from_secs(2); Scalar, Restart;
    }
}

/// Every section with its keys, in the order README lists them.
pub const SECTIONS: &[(&str, &[Key])] = &[
    ("catalog", CatalogSettings::KEYS),
    ("policy", PolicySettings::KEYS),
    ("inspect", InspectSettings::KEYS),
    ("proxy", ProxySettings::KEYS),
    ("upstream", UpstreamSettings::KEYS),
    ("transparent", TransparentSettings::KEYS),
    ("admin", AdminSettings::KEYS),
    ("metrics", MetricsSettings::KEYS),
    ("log", LogSettings::KEYS),
    ("reload", ReloadSettings::KEYS),
];

/// One `[[allow]]` or `[[deny]]` entry as written; [`super::operator_rule`] checks it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RuleEntry {
    pub host: Option<String>,
    pub cidr: Option<String>,
    pub regex: Option<String>,
    pub ports: Option<Vec<PortItem>>,
    pub comment: Option<String>,
}

/// Every setting, typed, with where each value came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub catalog: CatalogSettings,
    pub policy: PolicySettings,
    pub inspect: InspectSettings,
    pub proxy: ProxySettings,
    pub upstream: UpstreamSettings,
    pub transparent: TransparentSettings,
    pub admin: AdminSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    pub reload: ReloadSettings,
    pub allow: Vec<RuleEntry>,
    pub deny: Vec<RuleEntry>,
    /// `[[client_policy]]`: policies per client, in file order.
    pub client_policies: Vec<super::clients::ClientPolicySettings>,
    /// In a client policy's [`super::clients::derived`] settings: its name, and its own
    /// `[[client_policy.deny]]` (applied after the global `deny`). `None` and empty for
    /// the default policy.
    pub policy_name: Option<String>,
    pub own_deny: Vec<RuleEntry>,
    /// The file the settings came from, if any.
    pub file: Option<PathBuf>,
    /// Where each value came from (`catalog.region` → `file:line` or the variable name).
    pub origins: BTreeMap<String, String>,
}

impl Settings {
    /// Read every key of the collected tree into its type; problems go to the reader.
    pub(super) fn read(r: &mut Reader<'_>, rules: (Vec<RuleEntry>, Vec<RuleEntry>)) -> Self {
        Settings {
            catalog: CatalogSettings::read(r),
            policy: PolicySettings::read(r),
            inspect: InspectSettings::read(r),
            proxy: ProxySettings::read(r),
            upstream: UpstreamSettings::read(r),
            transparent: TransparentSettings::read(r),
            admin: AdminSettings::read(r),
            metrics: MetricsSettings::read(r),
            log: LogSettings::read(r),
            reload: ReloadSettings::read(r),
            allow: rules.0,
            deny: rules.1,
            client_policies: Vec::new(),
            policy_name: None,
            own_deny: Vec::new(),
            file: None,
            origins: BTreeMap::new(),
        }
    }

    /// Every key with its value as shown in messages, in schema order.
    pub fn shown(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        self.catalog.shown(&mut out);
        self.policy.shown(&mut out);
        self.inspect.shown(&mut out);
        self.proxy.shown(&mut out);
        self.upstream.shown(&mut out);
        self.transparent.shown(&mut out);
        self.admin.shown(&mut out);
        self.metrics.shown(&mut out);
        self.log.shown(&mut out);
        self.reload.shown(&mut out);
        out
    }
}
