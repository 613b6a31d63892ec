//! `aml-egress nva-rules`: the printed nftables rule set is accepted by the kernel (checked
//! with `nft -c`, then loaded for real, twice, in a network namespace this test makes), and
//! says what README promises: compute's web traffic redirected to the transparent listeners,
//! the catalog's service tags forwarded on their ports (TCP and UDP), the rest dropped.

mod support;

use std::process::Command;

use support::TempFile;
use support::netns::{Netns, able, run};

fn tags_file() -> TempFile {
    TempFile::new(
        "ServiceTags_Public.json",
        r#"{"changeNumber":3,"cloud":"Public","values":[
  {"name":"AzureMachineLearning","id":"AzureMachineLearning","properties":{"region":"","addressPrefixes":["13.66.87.135/32","13.66.140.80/28","13.66.140.64/26","2603:1030:f:1::/64"]}},
  {"name":"AzureActiveDirectory","id":"AzureActiveDirectory","properties":{"region":"","addressPrefixes":["20.190.128.0/18","2603:1006:2000::/48"]}},
  {"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{"region":"westeurope","addressPrefixes":["20.38.108.0/23"]}}
]}"#,
    )
}

fn nva_rules(config: &TempFile, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["nva-rules", "--config"])
        .arg(&config.0)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_printed_rules_load_into_the_kernel_and_say_what_they_should() {
    let tags = tags_file();
    let config = TempFile::new(
        "nva.toml",
        &format!(
            "[catalog]\ncloud = \"public\"\nregion = \"westeurope\"\nstorage_account = \"amlstore\"\nservice_tags_file = {:?}\n[transparent]\ntls_listen = [\"0.0.0.0:15443\"]\nhttp_listen = [\"0.0.0.0:15080\"]\n[admin]\nlisten = \"127.0.0.1:9464\"\n",
            tags.0
        ),
    );
    let (code, rules, err) = nva_rules(
        &config,
        &[
            "--from",
            "10.0.1.0/24",
            "--from",
            "fd00:1::/64",
            "--redirect",
            "8443=tls",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for line in [
        "ip saddr @compute4 tcp dport { 80 } redirect to :15080",
        "ip saddr @compute4 tcp dport { 443, 8443 } redirect to :15443",
        // A tag's prefix allows no TLS port (catalog.service_tags_nameless_tls = "deny"):
        // 443 goes to the proxy, decided by name; the tag's other ports are forwarded.
        "tcp dport { 8787, 18881 } accept comment \"AzureMachineLearning\"",
        "# Storage.WestEurope: TCP only on TLS ports, decided by name at the proxy",
        "udp dport { 5831 } accept comment \"AzureMachineLearning\"",
        "ip saddr @compute4 counter drop",
        "ip saddr 168.63.129.16 tcp dport 9464 accept",
        "--next-hop-type VirtualAppliance",
        "BatchNodeManagement.westeurope --next-hop-type Internet",
        "net.ipv4.ip_forward=1",
    ] {
        assert!(rules.contains(line), "missing {line:?} in:\n{rules}");
    }
    // SMB (445, allowed to the storage account) is never TLS: left to the network rules.
    assert!(
        !rules
            .lines()
            .any(|l| l.contains("redirect") && l.contains("445")),
        "{rules}"
    );
    // Overlapping prefixes (13.66.140.80/28 inside 13.66.140.64/26) are merged by the set.
    assert!(rules.contains("auto-merge"));

    // Usage errors say what to give.
    let (code, _, err) = nva_rules(&config, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--from"), "{err}");
    let (code, _, err) = nva_rules(
        &config,
        &["--from", "10.0.1.0/24", "--redirect", "8443=udp"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("tls, http or none"), "{err}");

    if !able() {
        return;
    }
    let file = TempFile::new("nva.nft", &rules);
    let ns = Netns::new("amlnft");
    let path = file.0.to_str().unwrap();
    run(&["ip", "netns", "exec", &ns.0, "nft", "-c", "-f", path]);
    run(&["ip", "netns", "exec", &ns.0, "nft", "-f", path]);
    // Loading again replaces the table instead of failing or doubling it.
    run(&["ip", "netns", "exec", &ns.0, "nft", "-f", path]);
    let listed = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "nft",
            "list",
            "chain",
            "inet",
            "aml_egress",
            "to_proxy",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.matches("redirect to :15080").count(), 2, "{listed}");
}
