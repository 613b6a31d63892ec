//! The matching semantics README promises, one named test each, through the same loader
//! the binary uses.

mod support;

use aml_egress::policy::{PathView, Reason, Verdict};
use support::{build_error, built};

fn decide(b: &aml_egress::config::Built, target: &str) -> (Verdict, &'static str) {
    let d = b.policy.decide_str(target, PathView::Hidden);
    (d.verdict, d.reason.code().as_str())
}

fn allowed(b: &aml_egress::config::Built, target: &str) -> bool {
    b.policy.decide_str(target, PathView::Hidden).is_allowed()
}

const OPERATOR: &str = r#"
[[allow]]
host = "exact.contoso.com"
ports = [443]
[[allow]]
host = "*.sub.contoso.com"
ports = [443, "8000-8010"]
[[allow]]
host = "xn--bcher-kva.example"
ports = [443]
"#;

#[test]
fn names_compare_case_insensitively() {
    let b = built(OPERATOR);
    assert!(allowed(&b, "EXACT.Contoso.COM:443"));
    assert!(allowed(&b, "Login.MicrosoftOnline.com:443"));
}

#[test]
fn one_trailing_dot_is_ignored_and_two_are_invalid() {
    let b = built(OPERATOR);
    assert!(allowed(&b, "exact.contoso.com.:443"));
    assert_eq!(
        decide(&b, "exact.contoso.com..:443"),
        (Verdict::Deny, "invalid_target")
    );
}

#[test]
fn idna_names_compare_in_punycode_and_unicode_config_is_refused_with_the_spelling() {
    let b = built(OPERATOR);
    assert!(allowed(&b, "XN--BCHER-KVA.example:443"));
    let err = build_error("[[allow]]\nhost = \"bücher.example\"\nports = [443]\n");
    assert!(err.contains("xn--bcher-kva.example"), "{err}");
    assert!(err.contains("allow[1].host"), "{err}");
}

#[test]
fn exact_name_matches_only_that_name() {
    let b = built(OPERATOR);
    assert!(allowed(&b, "exact.contoso.com:443"));
    assert!(!allowed(&b, "a.exact.contoso.com:443"));
    assert!(!allowed(&b, "xexact.contoso.com:443"));
}

#[test]
fn star_dot_matches_one_or_more_labels_but_never_the_apex() {
    let b = built(OPERATOR);
    assert!(allowed(&b, "a.sub.contoso.com:443"));
    assert!(allowed(&b, "a.b.c.sub.contoso.com:443"));
    assert_eq!(
        decide(&b, "sub.contoso.com:443"),
        (Verdict::Deny, "no_matching_rule")
    );
    assert!(!allowed(&b, "asub.contoso.com:443"));
}

#[test]
fn leading_star_without_dot_is_apex_and_subdomains_never_a_lookalike() {
    // The 2021-11 article writes *pytorch.org.
    let b = built("[catalog]\nrevision = \"2021-11\"\n");
    assert!(allowed(&b, "pytorch.org:443"));
    assert!(allowed(&b, "download.pytorch.org:443"));
    assert_eq!(
        decide(&b, "notpytorch.org:443"),
        (Verdict::Deny, "no_matching_rule")
    );
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("*pytorch.org") && w.contains("notpytorch.org")),
        "load-time note missing: {:?}",
        b.warnings
    );
}

#[test]
fn other_wildcard_positions_are_refused_at_load() {
    for pattern in [
        "a.*.contoso.com",
        "contoso.*",
        "a*b.contoso.com",
        "*.*.contoso.com",
    ] {
        let err = build_error(&format!("[[allow]]\nhost = \"{pattern}\"\nports = [443]\n"));
        assert!(err.contains("far left"), "{pattern}: {err}");
    }
}

#[test]
fn ports_are_part_of_every_rule() {
    let b = built(OPERATOR);
    assert_eq!(
        decide(&b, "exact.contoso.com:80"),
        (Verdict::Deny, "port_not_allowed")
    );
    assert!(allowed(&b, "x.sub.contoso.com:8005"));
    assert!(!allowed(&b, "x.sub.contoso.com:8011"));
    assert!(allowed(&b, "login.microsoftonline.com:80"));
    assert!(!allowed(&b, "login.microsoftonline.com:8443"));
}

#[test]
fn path_rules_are_enforced_for_plain_http() {
    let b = built("[catalog]\nrevision = \"2021-11\"\nfeatures = [\"vscode\"]\n");
    let base = "/microsoft/vscode-tools-for-ai/master/azureml_remote_websocket_server/";
    let ok = b.policy.decide_str(
        "raw.githubusercontent.com:80",
        PathView::Visible(&format!("{base}server.tar.gz")),
    );
    assert!(ok.is_allowed());
    let no = b.policy.decide_str(
        "raw.githubusercontent.com:80",
        PathView::Visible("/evil/repo/x"),
    );
    assert_eq!(
        (no.verdict, no.reason),
        (Verdict::Deny, Reason::PathNotAllowed)
    );
    let escape = b.policy.decide_str(
        "raw.githubusercontent.com:80",
        PathView::Visible(&format!("{base}../../../../evil")),
    );
    assert!(!escape.is_allowed());
}

#[test]
fn path_rules_are_widened_over_tls_by_default_with_a_warning() {
    let b = built("[catalog]\nrevision = \"2021-11\"\nfeatures = [\"vscode\"]\n");
    let d = b
        .policy
        .decide_str("raw.githubusercontent.com:443", PathView::Hidden);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Allow, Reason::AllowedWidened)
    );
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("raw.githubusercontent.com") && w.contains("widened")),
        "{:?}",
        b.warnings
    );
}

#[test]
fn path_rules_are_denied_over_tls_when_configured() {
    let b = built(
        "[catalog]\nrevision = \"2021-11\"\nfeatures = [\"vscode\"]\n[policy]\ntls_path_rules = \"deny\"\n",
    );
    let d = b
        .policy
        .decide_str("raw.githubusercontent.com:443", PathView::Hidden);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Deny, Reason::PathHiddenByTls)
    );
}

#[test]
fn ip_literals_match_only_cidr_rules() {
    let b = built(
        r#"
[[allow]]
host = "*.contoso.com"
ports = [443]
[[allow]]
cidr = "20.0.0.0/8"
ports = [443]
[[allow]]
cidr = "2001:db8::/32"
ports = [443]
"#,
    );
    assert!(allowed(&b, "20.1.2.3:443"));
    assert!(allowed(&b, "[2001:db8::1]:443"));
    assert!(allowed(&b, "[::ffff:20.1.2.3]:443"));
    assert_eq!(
        decide(&b, "21.1.2.3:443"),
        (Verdict::Deny, "no_matching_rule")
    );
    assert_eq!(
        decide(&b, "20.1.2.3:80"),
        (Verdict::Deny, "port_not_allowed")
    );
    // No catalog name pattern ever matches an address.
    assert!(!allowed(&b, "13.107.246.1:443"));
}

#[test]
fn deny_entries_win_over_every_allow() {
    let b = built(
        r#"
[catalog]
revision = "2021-11"
[[deny]]
host = "bad.anaconda.com"
[[deny]]
host = "*.anaconda.org"
ports = [80]
[[deny]]
cidr = "20.1.0.0/16"
[[allow]]
cidr = "20.0.0.0/8"
ports = [443]
"#,
    );
    assert_eq!(
        decide(&b, "bad.anaconda.com:443"),
        (Verdict::Deny, "deny_rule")
    );
    assert!(allowed(&b, "repo.anaconda.com:443"));
    assert_eq!(
        decide(&b, "conda.anaconda.org:80"),
        (Verdict::Deny, "deny_rule")
    );
    assert!(allowed(&b, "conda.anaconda.org:443"));
    assert_eq!(decide(&b, "20.1.2.3:443"), (Verdict::Deny, "deny_rule"));
    assert!(allowed(&b, "20.2.2.3:443"));
}

#[test]
fn regex_rules_match_the_normalised_name() {
    let b = built("[[allow]]\nregex = \"^build[0-9]+\\\\.contoso\\\\.com$\"\nports = [443]\n");
    assert!(allowed(&b, "BUILD12.contoso.com:443"));
    assert!(!allowed(&b, "buildx.contoso.com:443"));
    assert!(!allowed(&b, "build1.contoso.com:80"));
}

#[test]
fn invalid_targets_are_denied_with_reason_invalid_target() {
    let b = built(OPERATOR);
    let long_label = format!("{}.contoso.com:443", "a".repeat(64));
    let long_name = format!("{}.com:443", vec!["a".repeat(60); 5].join("."));
    for t in [
        "",
        "exact..contoso.com:443",
        long_label.as_str(),
        long_name.as_str(),
        "exa$ct.contoso.com:443",
        "user@exact.contoso.com:443",
        "exact%2econtoso.com:443",
        "*.sub.contoso.com:443",
        "exact.contoso.com",
        "exact.contoso.com:0",
        "exact.contoso.com:65536",
        "exact.contoso.com:https",
        "2001:db8::1:443",
    ] {
        assert_eq!(decide(&b, t), (Verdict::Deny, "invalid_target"), "{t:?}");
    }
}

#[test]
fn unconfigured_placeholders_are_left_out_with_a_warning_never_matched_literally() {
    let b = built("");
    assert!(!allowed(&b, "<storage>.blob.core.windows.net:443"));
    assert!(
        b.policy
            .rules()
            .iter()
            .all(|r| !r.what.to_string().contains('<'))
    );
    assert!(
        b.warnings
            .iter()
            .any(|w| w.contains("<storage>.file.core.windows.net")
                && w.contains("catalog.storage_account")),
        "{:?}",
        b.warnings
    );
    let b = built("[catalog]\nstorage_account = \"amlstore\"\nregion = \"westus\"\n");
    assert!(allowed(&b, "amlstore.file.core.windows.net:445"));
    assert!(!allowed(&b, "other.file.core.windows.net:445"));
}

#[test]
fn inbound_udp_and_service_tag_entries_never_allow_traffic() {
    let b = built("[catalog]\nfeatures = [\"all\"]\nregion = \"westus\"\n");
    assert!(!b.reference.is_empty());
    // A service tag name is not a host, and a UDP or inbound port is never opened by a
    // reference entry (another rule may still allow the same name on 443).
    for e in b.reference.iter() {
        let port = e.ports.split([',', '-']).next().unwrap();
        let target = format!("{}:{port}", e.pattern.to_ascii_lowercase());
        assert!(
            !allowed(&b, &target),
            "{target} allowed through a reference entry"
        );
    }
    assert!(
        b.reference
            .iter()
            .any(|e| e.pattern == "AzureMachineLearning")
    );
    assert!(b.reference.iter().any(|e| e.pattern == "Storage.westus"));
}

/// A refusal names the nearest allow rules; with a large policy (above 2000 rules) only
/// rules under the same registrable domain are searched, so that the hint stays cheap.
#[test]
fn the_nearest_rule_hint_stays_within_the_domain_in_large_policies() {
    let mut toml = String::new();
    for i in 0..2500 {
        toml.push_str(&format!(
            "[[allow]]\nhost = \"svc{i}.example.org\"\nports = [443]\n"
        ));
    }
    toml.push_str("[[allow]]\nhost = \"*.contoso.com\"\nports = [443]\n");
    let b = built(&toml);
    let d = b
        .policy
        .decide_str("api.fabrikam.contoso.com:8443", PathView::Hidden);
    let why = b.policy.explain("api.fabrikam.contoso.com:8443", &d);
    assert!(why.contains("*.contoso.com"), "{why}");
    let d = b
        .policy
        .decide_str("svc1.example.orgx:443", PathView::Hidden);
    let why = b.policy.explain("svc1.example.orgx:443", &d);
    assert_eq!(why, "no rule matches");
}

/// A path an upstream server might normalise out of the allowed prefix (`;` parameters,
/// `\`, percent-encoded `/`, `\` or `.`) is refused instead of matched.
#[test]
fn path_rules_refuse_paths_a_server_could_normalise_elsewhere() {
    let b = built("[catalog]\nrevision = \"2021-11\"\nfeatures = [\"vscode\"]\n");
    let base = "/microsoft/vscode-tools-for-ai/master/azureml_remote_websocket_server/";
    for rest in [
        "..;/..;/..;/..;/evil",
        "x;a=b/../../../../../evil",
        "..\\..\\..\\..\\evil",
        "..%2F..%2F..%2F..%2Fevil",
        "..%5c..%5c..%5c..%5cevil",
        "%2e%2e/%2E%2E/%2e%2e/%2e%2e/evil",
        "server.tar.gz;x",
    ] {
        let d = b.policy.decide_str(
            "raw.githubusercontent.com:80",
            PathView::Visible(&format!("{base}{rest}")),
        );
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, Reason::PathNotAllowed),
            "{rest}"
        );
    }
}
