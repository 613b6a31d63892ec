//! Exports and appliance rules of a configuration with `[[client_policy]]` policies (one
//! hub for several workspaces): `export --format azure-firewall` writes one rule
//! collection group per policy, each for the policy's own sources; `--policy NAME` exports
//! one policy; Squid gets a section per policy (parsed by `squid -k parse`); `nva-rules`
//! forwards each policy's service tags for its own clients only (checked by `nft -c`).

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;
use support::TempFile;
use support::netns::{Netns, able, run};

const BIN: &str = env!("CARGO_BIN_EXE_aml-egress");

fn tags_file() -> TempFile {
    TempFile::new(
        "ServiceTags_Public.json",
        r#"{"changeNumber":3,"cloud":"Public","values":[
  {"name":"AzureMachineLearning","id":"AzureMachineLearning","properties":{"region":"","addressPrefixes":["13.66.87.135/32","13.66.140.64/26","2603:1030:f:1::/64"]}},
  {"name":"AzureActiveDirectory","id":"AzureActiveDirectory","properties":{"region":"","addressPrefixes":["20.190.128.0/18","2603:1006:2000::/48"]}},
  {"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{"region":"westeurope","addressPrefixes":["20.38.108.0/23"]}},
  {"name":"Storage.NorthEurope","id":"Storage.NorthEurope","properties":{"region":"northeurope","addressPrefixes":["20.38.96.0/23","2603:1020:5::/48"]}}
]}"#,
    )
}

/// README's hub: team A and team B, each with its storage wildcard narrowed to its own
/// account; team B forwards its storage tag's prefixes on 443 too. `unmatched` is
/// `policy.unmatched_clients`.
fn hub(tags: &TempFile, unmatched: &str) -> TempFile {
    TempFile::new(
        "hub.toml",
        &format!(
            r#"
[catalog]
region = "westeurope"
storage_account = "defaultstore"
service_tags_file = {tags:?}
[catalog.narrow]
"*.blob.core.windows.net" = ["defaultstore.blob.core.windows.net"]
[policy]
unmatched_clients = "{unmatched}"
[[deny]]
host = "bad.anaconda.com"
[transparent]
tls_listen = ["0.0.0.0:15443"]
http_listen = ["0.0.0.0:15080"]

[[client_policy]]
name = "team-a"
sources = ["10.1.0.0/16"]
[client_policy.catalog]
region = "westeurope"
storage_account = "teamastore"
service_tags_file = {tags:?}
[client_policy.catalog.narrow]
"*.blob.core.windows.net" = ["teamastore.blob.core.windows.net"]
[[client_policy.allow]]
cidr = "192.0.2.0/24"
ports = [5432]
[[client_policy.deny]]
cidr = "2603:1030:f:1::/64"

[[client_policy]]
name = "team-b"
sources = ["10.2.0.0/16", "fd00:2::/48"]
mode = "audit"
[client_policy.catalog]
region = "northeurope"
storage_account = "teambstore"
features = ["pip_downloads", "vscode"]
service_tags_file = {tags:?}
service_tags_nameless_tls = "allow"
[client_policy.catalog.narrow]
"*.blob.core.windows.net" = ["teambstore.blob.core.windows.net"]
[[client_policy.allow]]
host = "pypi.contoso.com"
ports = [443]
"#,
            tags = tags.0.display().to_string()
        ),
    )
}

/// Run the binary: exit code, standard output, standard error.
fn aml(args: &[&str], config: &TempFile) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&config.0)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A group's rules, each checked for the shape Azure requires and for `sources`; its
/// target FQDNs and destination addresses (service tags included).
fn group_rules(group: &Value, sources: &[&str]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut targets = BTreeSet::new();
    let props = &group["properties"];
    assert!((100..=65000).contains(&props["priority"].as_u64().unwrap()));
    for c in props["ruleCollections"].as_array().unwrap() {
        assert_eq!(
            c["ruleCollectionType"],
            "FirewallPolicyFilterRuleCollection"
        );
        assert!(["Allow", "Deny"].contains(&c["action"]["type"].as_str().unwrap()));
        for r in c["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            assert!(!name.is_empty() && name.len() <= 80, "{name}");
            assert!(names.insert(name.to_owned()), "duplicate rule name {name}");
            assert_eq!(r["sourceAddresses"], serde_json::json!(sources), "{r}");
            for key in ["targetFqdns", "destinationFqdns", "destinationAddresses"] {
                for t in r[key].as_array().into_iter().flatten() {
                    targets.insert(t.as_str().unwrap().to_owned());
                }
            }
        }
    }
    targets
}

#[test]
fn azure_firewall_gets_one_rule_collection_group_per_policy_for_its_own_sources() {
    let tags = tags_file();
    let cfg = hub(&tags, "default");
    let (code, text, err) = aml(&["export", "--format", "azure-firewall"], &cfg);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let groups = v.as_array().expect("an array of rule collection groups");
    let names: Vec<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["aml-egress-team-a", "aml-egress-team-b"]);
    let priorities: Vec<u64> = groups
        .iter()
        .map(|g| g["properties"]["priority"].as_u64().unwrap())
        .collect();
    assert!(priorities.windows(2).all(|w| w[0] < w[1]), "{priorities:?}");
    let a = group_rules(&groups[0], &["10.1.0.0/16"]);
    let b = group_rules(&groups[1], &["10.2.0.0/16", "fd00:2::/48"]);
    // The catalog is in both; each workspace's storage account in its own group only.
    for t in [&a, &b] {
        assert!(t.contains("ml.azure.com"), "{t:?}");
        assert!(t.contains("AzureActiveDirectory"), "{t:?}");
        assert!(!t.contains("*.blob.core.windows.net"), "{t:?}");
    }
    assert!(a.contains("teamastore.blob.core.windows.net"), "{a:?}");
    assert!(!b.contains("teamastore.blob.core.windows.net"), "{b:?}");
    assert!(b.contains("teambstore.blob.core.windows.net"), "{b:?}");
    assert!(!a.contains("teambstore.blob.core.windows.net"), "{a:?}");
    assert!(b.contains("pypi.contoso.com") && !a.contains("pypi.contoso.com"));
    // Team B forwards its region's storage tag on 443; team A leaves it to the proxy.
    assert!(b.contains("Storage.NorthEurope") && !a.contains("Storage.WestEurope"));
    assert!(!text.contains("defaultstore"), "{text}");
    // The global [[deny]] applies to every policy, in a Deny collection first.
    for g in groups {
        let collections = g["properties"]["ruleCollections"].as_array().unwrap();
        assert_eq!(collections[0]["action"]["type"], "Deny", "{g}");
        assert!(
            collections[0].to_string().contains("bad.anaconda.com"),
            "{g}"
        );
    }
    // Audit mode is the proxy's; a firewall enforces what it is given: said.
    assert!(
        err.contains("policy team-b is in audit mode: the proxy lets its denials through, but the exported rules enforce them")
            && !err.contains("policy team-a is in audit mode"),
        "{err}"
    );
    // The default policy cannot be written for "every other source": said, with the way.
    assert!(
        err.contains("default policy is not exported") && err.contains("--policy default --source"),
        "{err}"
    );

    // With --source, the default policy's group comes last, for those addresses.
    let (code, text, err) = aml(
        &[
            "export",
            "--format",
            "azure-firewall",
            "--source",
            "10.9.0.0/16",
        ],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let groups = v.as_array().unwrap();
    assert_eq!(groups.len(), 3);
    assert_eq!(groups[2]["name"], "aml-egress-default");
    assert_eq!(groups[2]["properties"]["priority"], 400);
    let d = group_rules(&groups[2], &["10.9.0.0/16"]);
    assert!(d.contains("defaultstore.blob.core.windows.net"), "{d:?}");
    group_rules(&groups[0], &["10.1.0.0/16"]);

    // A --source that holds a spoke's clients would give them the default's rules too.
    let (_, _, err) = aml(
        &[
            "export",
            "--format",
            "azure-firewall",
            "--source",
            "10.0.0.0/8",
        ],
        &cfg,
    );
    assert!(
        err.contains("overlaps policy team-a's 10.1.0.0/16"),
        "{err}"
    );

    // Under policy.unmatched_clients = "refuse" the default policy serves nobody.
    let refusing = hub(&tags, "refuse");
    let (code, text, err) = aml(&["export", "--format", "azure-firewall"], &refusing);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(err.contains("\"refuse\""), "{err}");
}

#[test]
fn one_policy_is_exported_with_its_sources_or_the_given_ones() {
    let tags = tags_file();
    let cfg = hub(&tags, "default");
    let (code, text, err) = aml(
        &["export", "--format", "azure-firewall", "--policy", "team-a"],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    // Named and placed as in the export of every policy, so groups exported one at a
    // time do not collide.
    assert_eq!(v["name"], "aml-egress-team-a");
    assert_eq!(v["properties"]["priority"], 200);
    let a = group_rules(&v, &["10.1.0.0/16"]);
    assert!(a.contains("teamastore.blob.core.windows.net") && a.contains("ml.azure.com"));
    assert!(!a.contains("teambstore.blob.core.windows.net"));

    // --source overrides the policy's own.
    let (code, text, err) = aml(
        &[
            "export",
            "--format",
            "azure-firewall",
            "--policy",
            "team-b",
            "--source",
            "10.2.4.0/24",
        ],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["name"], "aml-egress-team-b");
    assert_eq!(v["properties"]["priority"], 300);
    let b = group_rules(&v, &["10.2.4.0/24"]);
    assert!(b.contains("pypi.contoso.com"), "{b:?}");

    // The default policy alone, for any source as before, with a warning.
    let (code, text, err) = aml(
        &[
            "export",
            "--format",
            "azure-firewall",
            "--policy",
            "default",
        ],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["name"], "aml-egress-default");
    assert_eq!(v["properties"]["priority"], 400);
    let d = group_rules(&v, &["*"]);
    assert!(d.contains("defaultstore.blob.core.windows.net"), "{d:?}");
    assert!(err.contains("give --source"), "{err}");

    // Squid: the policy's own source ACL.
    let (code, text, err) = aml(&["export", "--format", "squid", "--policy", "team-a"], &cfg);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("acl aml_src src 10.1.0.0/16\n"), "{text}");

    // An unknown policy: exit 2, naming the policies there are; catalog and validate too.
    for args in [
        &["export", "--format", "azure-firewall", "--policy", "team-c"][..],
        &["catalog", "--policy", "team-c"][..],
        &["validate", "--policy", "team-c"][..],
    ] {
        let (code, out, err) = aml(args, &cfg);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("\"team-c\"") && err.contains("default, team-a, team-b"),
            "{err}"
        );
    }
}

#[test]
fn catalog_and_validate_show_the_named_policy() {
    let tags = tags_file();
    let cfg = hub(&tags, "default");
    let (code, text, err) = aml(&["catalog", "--policy", "team-b"], &cfg);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("pypi.contoso.com"), "{text}");
    assert!(text.contains("teambstore.blob.core.windows.net"), "{text}");
    let (_, default, _) = aml(&["catalog"], &cfg);
    assert!(!default.contains("pypi.contoso.com"), "{default}");
    let (code, text, _) = aml(&["catalog", "--policy", "team-b", "--features"], &cfg);
    assert_eq!(code, 0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("on ") && l.contains("vscode")),
        "{text}"
    );

    let (code, text, err) = aml(&["validate", "--policy", "team-b"], &cfg);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("valid (catalog"), "{text}");
    assert!(
        text.contains("optional parts on:") && text.contains("vscode"),
        "{text}"
    );
    assert!(
        text.contains("policy team-b (audit): serves 10.2.0.0/16, fd00:2::/48"),
        "{text}"
    );
    assert!(!text.contains("client policies:"), "{text}");
    // Team B is in audit mode: what it denies, the proxy lets through and logs, and check
    // says so; an operator's deny rule holds in every mode.
    let (code, text, _) = aml(
        &[
            "check",
            "--client",
            "10.2.4.7",
            "teamastore.blob.core.windows.net:443",
        ],
        &cfg,
    );
    assert_eq!(code, 1);
    assert!(
        text.trim_end()
            .ends_with("[policy team-b, audit: let through and logged]"),
        "{text}"
    );
    let (_, text, _) = aml(
        &[
            "check",
            "--json",
            "--client",
            "10.2.4.7",
            "teamastore.blob.core.windows.net:443",
            "bad.anaconda.com:443",
        ],
        &cfg,
    );
    let outcomes: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["outcome"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(outcomes, ["would_deny", "deny"], "{text}");
    // A certificate name where no policy is chosen by one: said, not silently ignored.
    let (_, _, err) = aml(
        &[
            "check",
            "--client-name",
            "ws.team-a.test",
            "ml.azure.com:443",
        ],
        &cfg,
    );
    assert!(
        err.contains("no [[client_policy]] has client_names"),
        "{err}"
    );
    // Team B's vscode part brings names that need inspection; the list is every policy's,
    // and says so under any policy.
    let (_, text, _) = aml(&["validate", "--policy", "team-a"], &cfg);
    assert!(
        text.contains("inspected over every policy (one CA serves them all): "),
        "{text}"
    );
}

#[test]
fn squid_gets_a_section_per_policy_and_parses() {
    let tags = tags_file();
    let cfg = hub(&tags, "default");
    let (code, text, err) = aml(&["export", "--format", "squid"], &cfg);
    assert_eq!(code, 0, "{err}");
    for line in [
        "# policy team-a: 10.1.0.0/16",
        "acl aml_team-a_src src 10.1.0.0/16",
        "acl aml_team-b_src src 10.2.0.0/16 fd00:2::/48",
        "acl aml_claimed src 10.1.0.0/16 10.2.0.0/16 fd00:2::/48",
        "dstdomain -n teamastore.blob.core.windows.net",
        "dstdomain -n pypi.contoso.com",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Every access line is qualified by its policy's clients; the last refuses the rest.
    let access: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_access"))
        .collect();
    assert_eq!(access.last(), Some(&"http_access deny all"));
    for l in &access[..access.len() - 1] {
        assert!(
            l.contains(" aml_team-a_src ")
                || l.contains(" aml_team-b_src ")
                || l.contains(" !aml_claimed "),
            "{l}"
        );
    }
    // Team A's account is allowed to team A's clients alone.
    let acl = text
        .lines()
        .find(|l| l.contains("dstdomain -n teamastore.blob.core.windows.net"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    for l in access.iter().filter(|l| l.contains(&format!(" {acl} "))) {
        assert!(l.starts_with("http_access allow aml_team-a_src "), "{l}");
    }
    // Deny lines first within each section; the global [[deny]] in every one.
    let sections: Vec<&str> = text.split("\n# policy ").skip(1).collect();
    assert_eq!(sections.len(), 3, "{text}");
    for section in sections {
        let lines: Vec<&str> = section
            .lines()
            .filter(|l| l.starts_with("http_access") && *l != "http_access deny all")
            .collect();
        let allows = lines
            .iter()
            .position(|l| l.starts_with("http_access allow"));
        let denies = lines
            .iter()
            .rposition(|l| l.starts_with("http_access deny"));
        assert!(
            matches!((denies, allows), (Some(d), Some(a)) if d < a),
            "{section}"
        );
    }
    let (_, refusing, _) = aml(&["export", "--format", "squid"], &hub(&tags, "refuse"));
    assert!(!refusing.contains("aml_claimed"), "{refusing}");

    let found = Command::new("squid")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "CI installs squid");
        eprintln!("skipped: squid is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("aml-egress-squid-pe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:3999\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log none\n{text}",
            d = dir.display()
        ),
    )
    .unwrap();
    let parsed = Command::new("squid")
        .args(["-k", "parse", "-f"])
        .arg(&conf)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = String::from_utf8_lossy(&parsed.stderr);
    assert!(parsed.status.success() && !said.contains("FATAL"), "{said}");
}

#[test]
fn nva_rules_forward_each_policys_network_rules_for_its_own_clients() {
    let tags = tags_file();
    let cfg = hub(&tags, "default");
    let (code, rules, err) = aml(
        &["nva-rules", "--from", "10.0.0.0/8", "--from", "fd00::/16"],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");
    for line in [
        "set p1_src4",
        "elements = { 10.1.0.0/16 }",
        "set p2_src6",
        "elements = { fd00:2::/48 }",
        "set unclaimed4",
        "# policy team-a: its clients only",
        "# policy team-b: its clients only",
        "# policy default: the --from addresses no client policy claims",
        "ip saddr @p1_src4 ip daddr @p1_tag",
        "ip6 saddr @p2_src6 ip6 daddr @p2_tag",
        "ip saddr @unclaimed4 ip daddr @tag",
        "BatchNodeManagement.northeurope --next-hop-type Internet",
        "ip saddr @compute4 tcp dport { 80 } redirect to :15080",
    ] {
        assert!(rules.contains(line), "missing {line:?} in:\n{rules}");
    }
    // Each rule that forwards reads one policy's sets alone: its clients, its tags.
    for l in rules.lines().filter(|l| l.contains(" accept comment")) {
        let l = l.trim();
        if l.starts_with("ip saddr 168.63.129.16") {
            continue;
        }
        let src = l.split_whitespace().nth(2).unwrap();
        let dst = l.split_whitespace().nth(5).unwrap();
        if !dst.starts_with('@') {
            // A CIDR rule of a policy's own: its clients, its comment.
            assert!(src == "@p1_src4" && l.contains("\"team-a: "), "{l}");
            continue;
        }
        let ok = match src {
            "@p1_src4" | "@p1_src6" => dst.starts_with("@p1_tag") && l.contains("\"team-a: "),
            "@p2_src4" | "@p2_src6" => dst.starts_with("@p2_tag") && l.contains("\"team-b: "),
            "@unclaimed4" | "@unclaimed6" => dst.starts_with("@tag") && l.contains("\"default: "),
            _ => false,
        };
        assert!(ok, "{l}");
    }
    // Team A's own CIDR rules, for team A's clients alone: its denial before any accept.
    let a_deny = "ip6 saddr @p1_src6 ip6 daddr 2603:1030:f:1::/64 meta l4proto tcp counter drop comment \"team-a: deny 2603:1030:f:1::/64\"";
    let a_allow = "ip saddr @p1_src4 ip daddr 192.0.2.0/24 tcp dport { 5432 } accept comment \"team-a: allow 192.0.2.0/24\"";
    let at = |l: &str| {
        rules
            .find(l)
            .unwrap_or_else(|| panic!("missing {l:?} in:\n{rules}"))
    };
    assert!(
        at(a_deny) < at("ip saddr @p1_src4 ip daddr @p1_tag"),
        "{rules}"
    );
    at(a_allow);
    assert_eq!(
        rules.matches("192.0.2.0/24 tcp dport").count(),
        1,
        "{rules}"
    );
    // Team B forwards its storage tag on 443; nobody else does.
    let storage: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("Storage.") && l.contains(" accept"))
        .collect();
    assert!(!storage.is_empty(), "{rules}");
    assert!(storage.iter().all(|l| l.contains("@p2_src")), "{storage:?}");
    // The addresses no policy claims: 10.0.0.0/8 less the spokes'.
    let unclaimed = rules
        .split("set unclaimed4 {")
        .nth(1)
        .unwrap()
        .split('}')
        .next()
        .unwrap()
        .to_owned();
    assert!(unclaimed.contains("10.0.0.0/16") && !unclaimed.contains("10.1.0.0/16"));

    // Refusing unclaimed clients: no default block; --from defaults to the policies'.
    let (code, refusing, err) = aml(&["nva-rules"], &hub(&tags, "refuse"));
    assert_eq!(code, 0, "{err}");
    assert!(!refusing.contains("@unclaimed4"), "{refusing}");
    assert!(
        refusing.contains("unmatched_clients = \"refuse\""),
        "{refusing}"
    );
    assert!(
        refusing.contains("elements = { 10.1.0.0/16, 10.2.0.0/16 }"),
        "{refusing}"
    );

    if !able() {
        return;
    }
    for text in [&rules, &refusing] {
        let file = TempFile::new("hub.nft", text);
        let ns = Netns::new("amlpe");
        let path = file.0.to_str().unwrap();
        run(&["ip", "netns", "exec", &ns.0, "nft", "-c", "-f", path]);
        run(&["ip", "netns", "exec", &ns.0, "nft", "-f", path]);
    }
}

/// A policy with a wide source and a narrower one inside another policy's prefix: each
/// address is exported in exactly the group of the policy the proxy chooses for it (the
/// most specific prefix), never in none or two.
#[test]
fn exported_sources_follow_the_most_specific_prefix_as_the_proxy_does() {
    let cfg = TempFile::new(
        "nested.toml",
        r#"
[[client_policy]]
name = "team-a"
sources = ["10.1.0.0/16"]
[[client_policy.allow]]
host = "a.example.test"
ports = [443]

[[client_policy]]
name = "team-b"
sources = ["10.0.0.0/8", "10.1.5.0/24"]
[[client_policy.allow]]
host = "b.example.test"
ports = [443]
"#,
    );
    let (code, text, err) = aml(&["export", "--format", "azure-firewall"], &cfg);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let groups: Vec<(String, Vec<ipnet::IpNet>)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let rule = &g["properties"]["ruleCollections"][0]["rules"][0];
            let sources = rule["sourceAddresses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().parse().unwrap())
                .collect();
            (g["name"].as_str().unwrap().to_owned(), sources)
        })
        .collect();
    for ip in [
        "10.1.5.9",
        "10.1.5.0",
        "10.1.6.9",
        "10.1.0.1",
        "10.2.0.1",
        "10.255.0.1",
    ] {
        let (_, out, err) = aml(&["check", "--client", ip, "a.example.test:443"], &cfg);
        let chosen = out
            .trim_end()
            .rsplit_once("[policy ")
            .map(|(_, p)| p.trim_end_matches(']').to_owned())
            .unwrap_or_else(|| panic!("{out}{err}"));
        let addr: std::net::IpAddr = ip.parse().unwrap();
        let holding: Vec<&str> = groups
            .iter()
            .filter(|(_, s)| s.iter().any(|n| n.contains(&addr)))
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(holding, [format!("aml-egress-{chosen}")], "{ip}: {text}");
    }
}

/// Azure Firewall takes group priorities up to 65000: a policy past the 648th is warned
/// about, not silently given a priority another group has.
#[test]
fn a_policy_whose_group_priority_would_pass_azures_limit_is_warned_about() {
    let mut text = String::from("[policy]\nunmatched_clients = \"refuse\"\n");
    for i in 0..650 {
        text.push_str(&format!(
            "[[client_policy]]\nname = \"p{i}\"\nsources = [\"10.{}.{}.0/24\"]\n",
            i / 256,
            i % 256
        ));
    }
    let cfg = TempFile::new("many.toml", &text);
    let (code, out, err) = aml(&["export", "--format", "azure-firewall"], &cfg);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[647]["properties"]["priority"], 64_900);
    assert_eq!(v[648]["properties"]["priority"], 65_000);
    let warned: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("Azure Firewall takes at most 65000"))
        .collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains("(policy p649) its group's priority would be 65100"),
        "{err}"
    );
}
