//! Configuration: a table of rejected configurations (file snippet, key, expected problem),
//! one row per closed setting and numeric range, in the style of named test cases; every
//! problem of a file reported at once; and the schema against the documented key table.

mod support;

use std::collections::BTreeSet;

use aml_egress::config::schema;
use support::settings;

/// A configuration that must be refused: what it is, the snippet, the key the error names,
/// and words the problem or fix must contain.
struct Rejected {
    name: &'static str,
    toml: &'static str,
    key: &'static str,
    says: &'static str,
}

const REJECTED: &[Rejected] = &[
    Rejected {
        name: "mode",
        toml: "[proxy]\nmode = \"block\"",
        key: "proxy.mode",
        says: "use \"enforce\" or \"audit\"",
    },
    Rejected {
        name: "sni_missing",
        toml: "[proxy]\nsni_missing = \"maybe\"",
        key: "proxy.sni_missing",
        says: "use \"deny\" or \"allow\"",
    },
    Rejected {
        name: "private_ranges",
        toml: "[upstream]\nprivate_ranges = \"allow\"",
        key: "upstream.private_ranges",
        says: "\"allow_matched\" or \"deny\"",
    },
    Rejected {
        name: "tls_path_rules",
        toml: "[policy]\ntls_path_rules = \"strict\"",
        key: "policy.tls_path_rules",
        says: "\"widen\"",
    },
    Rejected {
        name: "log level",
        toml: "[log]\nlevel = \"loud\"",
        key: "log.level",
        says: "\"error\" or \"warn\"",
    },
    Rejected {
        name: "log format",
        toml: "[log]\nformat = \"xml\"",
        key: "log.format",
        says: "\"json\" or \"text\"",
    },
    Rejected {
        name: "cloud",
        toml: "[catalog]\ncloud = \"mars\"",
        key: "catalog.cloud",
        says: "public, usgov, china",
    },
    Rejected {
        name: "region",
        toml: "[catalog]\nregion = \"westuss\"",
        key: "catalog.region",
        says: "did you mean westus",
    },
    Rejected {
        name: "storage account",
        toml: "[catalog]\nstorage_account = \"https://x\"",
        key: "catalog.storage_account",
        says: "3 to 24",
    },
    Rejected {
        name: "container registry",
        toml: "[catalog]\ncontainer_registry = \"a\"",
        key: "catalog.container_registry",
        says: "5 to 50",
    },
    Rejected {
        name: "max_connections zero",
        toml: "[proxy]\nmax_connections = 0",
        key: "proxy.max_connections",
        says: "1 to 1000000",
    },
    Rejected {
        name: "max_connections high",
        toml: "[proxy]\nmax_connections = 1000001",
        key: "proxy.max_connections",
        says: "1 to 1000000",
    },
    Rejected {
        name: "max_connections negative",
        toml: "[proxy]\nmax_connections = -1",
        key: "proxy.max_connections",
        says: "not a whole number",
    },
    Rejected {
        name: "per client",
        toml: "[proxy]\nmax_connections_per_client = 1000001",
        key: "proxy.max_connections_per_client",
        says: "0 (no limit) to 1000000",
    },
    Rejected {
        name: "header bytes low",
        toml: "[proxy]\nmax_header_bytes = 100",
        key: "proxy.max_header_bytes",
        says: "8192 to 1048576",
    },
    Rejected {
        name: "header bytes high",
        toml: "[proxy]\nmax_header_bytes = 2000000",
        key: "proxy.max_header_bytes",
        says: "8192 to 1048576",
    },
    Rejected {
        name: "header timeout zero",
        toml: "[proxy]\nheader_timeout_secs = 0",
        key: "proxy.header_timeout_secs",
        says: "more than 0 to 86400",
    },
    Rejected {
        name: "idle timeout high",
        toml: "[proxy]\nidle_timeout_secs = 86401",
        key: "proxy.idle_timeout_secs",
        says: "more than 0 to 86400",
    },
    Rejected {
        name: "grace period negative",
        toml: "[proxy]\ngrace_period_secs = -1",
        key: "proxy.grace_period_secs",
        says: "not a duration",
    },
    Rejected {
        name: "sni timeout text",
        toml: "[proxy]\nsni_timeout_secs = \"soon\"",
        key: "proxy.sni_timeout_secs",
        says: "not a duration",
    },
    Rejected {
        name: "dial timeout infinite",
        toml: "[upstream]\ndial_timeout_secs = inf",
        key: "upstream.dial_timeout_secs",
        says: "not a duration",
    },
    Rejected {
        name: "watch interval",
        toml: "[reload]\nwatch_interval_secs = 3601",
        key: "reload.watch_interval_secs",
        says: "0 (no watch) to 3600",
    },
    Rejected {
        name: "max cached certificates",
        toml: "[inspect]\nmax_cached_certs = 0",
        key: "inspect.max_cached_certs",
        says: "1 to 1000000",
    },
    Rejected {
        name: "inspected host with a path",
        toml: "[inspect]\nhosts = [\"files.example.com/x/*\"]",
        key: "inspect.hosts",
        says: "without a path",
    },
    Rejected {
        name: "bypassed host that is no pattern",
        toml: "[inspect]\nbypass = [\"a.*.example.com\"]",
        key: "inspect.bypass",
        says: "a wildcard may only stand at the far left",
    },
    Rejected {
        name: "max denied targets",
        toml: "[metrics]\nmax_denied_targets = 0",
        key: "metrics.max_denied_targets",
        says: "1 to 100000",
    },
    Rejected {
        name: "denied lines",
        toml: "[log]\ndenied_lines_per_minute = -5",
        key: "log.denied_lines_per_minute",
        says: "not a whole number",
    },
    Rejected {
        name: "tls port zero",
        toml: "[proxy]\ntls_ports = [0]",
        key: "proxy.tls_ports",
        says: "1 to 65535",
    },
    Rejected {
        name: "tls port too high",
        toml: "[proxy]\ntls_ports = [70000]",
        key: "proxy.tls_ports",
        says: "1 to 65535",
    },
    Rejected {
        name: "opaque port zero",
        toml: "[proxy]\nopaque_ports = [0]",
        key: "proxy.opaque_ports",
        says: "1 to 65535",
    },
    Rejected {
        name: "opaque and tls",
        toml: "[proxy]\nopaque_ports = [443]",
        key: "proxy.opaque_ports",
        says: "also in proxy.tls_ports",
    },
    Rejected {
        name: "listen",
        toml: "[proxy]\nlisten = [\"localhost\"]",
        key: "proxy.listen",
        says: "not an address:port",
    },
    Rejected {
        name: "no listener",
        toml: "[proxy]\nlisten = []",
        key: "proxy.listen",
        says: "no listener",
    },
    Rejected {
        name: "tls listener without a certificate",
        toml: "[proxy]\ntls_listen = [\"127.0.0.1:3129\"]",
        key: "proxy.tls_cert",
        says: "needs a certificate",
    },
    Rejected {
        name: "allow_clients",
        toml: "[proxy]\nallow_clients = [\"10.0.0.0/33\"]",
        key: "proxy.allow_clients",
        says: "not a network",
    },
    Rejected {
        name: "allow_cidrs",
        toml: "[upstream]\nallow_cidrs = [\"loopback\"]",
        key: "upstream.allow_cidrs",
        says: "not a network",
    },
    Rejected {
        name: "name_servers",
        toml: "[upstream]\nname_servers = [\"dns.example\"]",
        key: "upstream.name_servers",
        says: "not a name server",
    },
    Rejected {
        name: "connect_to",
        toml: "[upstream]\nconnect_to = { \"a.example:443\" = \"nowhere\" }",
        key: "upstream.connect_to",
        says: "\"address:port\"",
    },
    Rejected {
        name: "admin listen",
        toml: "[admin]\nlisten = \"everywhere\"",
        key: "admin.listen",
        says: "not an address:port",
    },
    Rejected {
        name: "admin off loopback",
        toml: "[admin]\nlisten = \"0.0.0.0:9464\"",
        key: "admin.listen",
        says: "bearer token",
    },
    Rejected {
        name: "admin token file",
        toml: "[admin]\ntoken_file = \"/nonexistent/token\"",
        key: "admin.token_file",
        says: "16 characters",
    },
    Rejected {
        name: "unknown key",
        toml: "[proxy]\nlisen = [\"127.0.0.1:3128\"]",
        key: "proxy.lisen",
        says: "did you mean listen?",
    },
    Rejected {
        name: "unknown section",
        toml: "[proxi]\nlisten = []",
        key: "proxi",
        says: "did you mean proxy?",
    },
    Rejected {
        name: "rule without ports",
        toml: "[[allow]]\nhost = \"a.example\"",
        key: "allow[1].ports",
        says: "needs its ports",
    },
    Rejected {
        name: "rule field",
        toml: "[[allow]]\nhots = \"a.example\"\nports = [443]",
        key: "allow[1].hots",
        says: "did you mean host",
    },
];

#[test]
fn every_closed_setting_and_range_is_refused_with_its_key_and_fix() {
    for r in REJECTED {
        let err = match settings(r.toml) {
            Ok(_) => panic!("{}: accepted:\n{}", r.name, r.toml),
            Err(e) => e,
        };
        let issue = err
            .0
            .iter()
            .find(|i| i.key == r.key)
            .unwrap_or_else(|| panic!("{}: no problem names {}: {err}", r.name, r.key));
        let text = issue.to_string();
        assert!(text.contains(r.says), "{}: {text}", r.name);
        assert!(!issue.origin.is_empty(), "{}: no origin: {text}", r.name);
    }
}

#[test]
fn every_problem_of_a_file_is_reported_at_once_with_its_origin() {
    let err = settings("[proxy]\nmode = \"x\"\nmax_connections = 0\n[log]\nformat = \"xml\"\n")
        .unwrap_err();
    let keys: Vec<&str> = err.0.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys.len(), 3, "{err}");
    for k in ["proxy.mode", "proxy.max_connections", "log.format"] {
        assert!(keys.contains(&k), "{k} missing: {err}");
    }
    let env = support::settings_env("", &[("AML_EGRESS__PROXY__MODE", "x")]).unwrap_err();
    assert!(
        env.to_string()
            .contains("environment variable AML_EGRESS__PROXY__MODE"),
        "{env}"
    );
}

#[test]
fn the_schema_and_the_documented_key_table_list_the_same_keys() {
    let readme = include_str!("../docs/configuration.md");
    let documented: BTreeSet<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
        .map(|(key, _)| key)
        .filter(|k| {
            k.contains('.') && !k.contains(' ') && !k.starts_with("aml") && !k.starts_with('[')
        })
        .collect();
    let declared: BTreeSet<&str> = schema::keys().map(|k| k.name).collect();
    assert_eq!(
        declared.difference(&documented).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "keys missing from docs/configuration.md"
    );
    assert_eq!(
        documented.difference(&declared).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "docs/configuration.md documents keys the schema does not have"
    );
}

#[test]
fn lists_come_from_the_environment_comma_separated() {
    let s = support::settings_env(
        "",
        &[
            ("AML_EGRESS__PROXY__OPAQUE_PORTS", "445,1433"),
            ("AML_EGRESS__PROXY__LISTEN", "127.0.0.1:3128,[::1]:3128"),
        ],
    )
    .unwrap();
    assert_eq!(s.proxy.opaque_ports, vec![445, 1433]);
    assert_eq!(s.proxy.listen.len(), 2);
    let lists: Vec<&str> = schema::env_list_keys().collect();
    assert!(lists.contains(&"proxy.opaque_ports") && lists.contains(&"upstream.name_servers"));
}
