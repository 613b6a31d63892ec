//! `aml-egress export`: the Azure Firewall rule collection group has the shape Azure
//! requires (fields, enums, limits, unique names, no bare leading star); the Squid lines
//! parse (`squid -k parse`) and, loaded into a running Squid, refuse exactly what
//! `aml-egress check` refuses over a table of targets.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::TempFile;

const BIN: &str = env!("CARGO_BIN_EXE_aml-egress");

fn config() -> (TempFile, TempFile) {
    let tags = TempFile::new(
        "ServiceTags.json",
        r#"{"changeNumber":1,"cloud":"Public","values":[
  {"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{"addressPrefixes":["127.77.0.0/16"]}},
  {"name":"AzureActiveDirectory","id":"AzureActiveDirectory","properties":{"addressPrefixes":["127.78.0.0/16"]}}]}"#,
    );
    let cfg = TempFile::new(
        "export.toml",
        &format!(
            "[catalog]\nregion = \"westeurope\"\nservice_tags_file = {:?}\n[catalog.narrow]\n\"*.blob.core.windows.net\" = [\"amlstore.blob.core.windows.net\"]\n[[allow]]\nhost = \"*contoso.com\"\nports = [443]\n[[allow]]\nregex = '^x[0-9]+\\.example\\.org$'\nports = [443]\n[[allow]]\nhost = \"smb.example.org\"\nports = [445]\n[[deny]]\nhost = \"bad.anaconda.com\"\n",
            tags.0
        ),
    );
    (cfg, tags)
}

fn export(format: &str, cfg: &TempFile) -> (String, String) {
    let out = Command::new(BIN)
        .args([
            "export",
            "--format",
            format,
            "--source",
            "10.0.1.0/24",
            "--config",
        ])
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_azure_firewall_rule_collection_group_has_the_required_shape() {
    let (cfg, _tags) = config();
    let (text, warnings) = export("azure-firewall", &cfg);
    assert!(
        warnings.contains("regex rules cannot be expressed"),
        "{warnings}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let props = &v["properties"];
    let prio = props["priority"].as_u64().unwrap();
    assert!((100..=65000).contains(&prio));
    let mut names = BTreeSet::new();
    let mut fqdns = Vec::new();
    let mut actions = Vec::new();
    for c in props["ruleCollections"].as_array().unwrap() {
        assert_eq!(
            c["ruleCollectionType"],
            "FirewallPolicyFilterRuleCollection"
        );
        assert!((100..=65000).contains(&c["priority"].as_u64().unwrap()));
        let action = c["action"]["type"].as_str().unwrap();
        assert!(["Allow", "Deny"].contains(&action));
        actions.push(action.to_owned());
        for r in c["rules"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            assert!(!name.is_empty() && name.len() <= 80, "{name}");
            assert!(names.insert(name.to_owned()), "duplicate rule name {name}");
            assert_eq!(r["sourceAddresses"], serde_json::json!(["10.0.1.0/24"]));
            match r["ruleType"].as_str().unwrap() {
                "ApplicationRule" => {
                    for p in r["protocols"].as_array().unwrap() {
                        assert!(["Http", "Https"].contains(&p["protocolType"].as_str().unwrap()));
                        assert!(p["port"].as_u64().unwrap() > 0);
                    }
                    for f in r["targetFqdns"].as_array().unwrap() {
                        fqdns.push(f.as_str().unwrap().to_owned());
                    }
                }
                "NetworkRule" => {
                    assert_eq!(r["ipProtocols"], serde_json::json!(["TCP"]));
                    assert!(!r["destinationPorts"].as_array().unwrap().is_empty());
                    let has = |k: &str| r[k].as_array().is_some_and(|a| !a.is_empty());
                    assert!(
                        has("destinationAddresses") || has("destinationFqdns"),
                        "{r}"
                    );
                }
                other => panic!("rule type {other}"),
            }
        }
    }
    // Deny first (its collection has the higher priority, the lower number).
    assert_eq!(actions, ["Deny", "Allow"]);
    // Never a bare leading star: *contoso.com is written as the name and its subdomains.
    assert!(
        fqdns
            .iter()
            .all(|f| !f.starts_with('*') || f.starts_with("*.")),
        "{fqdns:?}"
    );
    assert!(
        fqdns.contains(&"contoso.com".to_owned()) && fqdns.contains(&"*.contoso.com".to_owned())
    );
    // Service tags by name, a host on another port by name with its ports. Storage is
    // 443 only, which an address without a server name may not reach by a tag's prefix
    // (catalog.service_tags_nameless_tls = "deny"): left out, with a warning.
    assert!(text.contains("\"AzureActiveDirectory\""), "{text}");
    assert!(!text.contains("\"Storage.WestEurope\""), "{text}");
    assert!(
        warnings.contains("Storage.WestEurope") && warnings.contains("service_tags_nameless_tls"),
        "{warnings}"
    );
    // A narrowed wildcard is written as the names it still allows.
    assert!(fqdns.contains(&"amlstore.blob.core.windows.net".to_owned()));
    assert!(!fqdns.contains(&"*.blob.core.windows.net".to_owned()));
    assert!(
        text.contains("\"smb.example.org\"") && text.contains("\"445\""),
        "{text}"
    );
}

/// A Squid configuration around the exported lines, on `port`, writing only into `dir`.
fn squid_conf(dir: &std::path::Path, port: u16, lines: &str) -> std::path::PathBuf {
    let conf = dir.join("squid.conf");
    // Every name resolves to loopback, where nothing listens on the targets' ports: Squid
    // answers what it allows at once with a connect error, never waiting on DNS.
    let names = "anaconda.com repo.anaconda.com bad.anaconda.com pypi.org notpytorch.org contoso.com www.contoso.com th3re4lcontoso.com smb.example.org amlstore.blob.core.windows.net other.blob.core.windows.net";
    std::fs::write(dir.join("hosts"), format!("127.0.0.1 {names}\n")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log none\ncache deny all\ncache_mem 0 MB\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\nhosts_file {d}/hosts\ndns_nameservers 127.0.0.1\ndns_timeout 1 seconds\nconnect_timeout 1 seconds\n{lines}",
            d = dir.display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn squid_loaded_with_the_export_refuses_what_aml_egress_refuses() {
    let found = Command::new("squid")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "CI installs squid");
        eprintln!("skipped: squid is not installed");
        return;
    }
    let (cfg, _tags) = config();
    let (lines, _) = export("squid", &cfg);
    let dir = std::env::temp_dir().join(format!("aml-egress-squid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Squid drops to its own user: let it write its pid and log here.
    let _ = Command::new("chmod").arg("0777").arg(&dir).status();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Squid reads `--source`'s ACL too: the client here is loopback.
    let lines = lines.replace("acl aml_src src 10.0.1.0/24", "acl aml_src src 127.0.0.0/8");
    let conf = squid_conf(&dir, port, &lines);
    let parsed = Command::new("squid")
        .arg("-k")
        .arg("parse")
        .arg("-f")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );

    let mut squid = Command::new("squid")
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) for Squid to listen: polling an external process.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < until, "squid did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let targets = [
        "anaconda.com:443",
        "repo.anaconda.com:443",
        "bad.anaconda.com:443",
        "pypi.org:443",
        "pypi.org:8080",
        "notpytorch.org:443",
        "contoso.com:443",
        "www.contoso.com:443",
        "th3re4lcontoso.com:443",
        "smb.example.org:445",
        "smb.example.org:443",
        // Loopback prefixes in the test's Service Tags file: what Squid allows it dials
        // here, never off this machine.
        "127.77.0.5:443",
        "127.77.0.5:80",
        "1.2.3.4:443",
        // A narrowed wildcard: the listed name, and one it no longer allows.
        "amlstore.blob.core.windows.net:443",
        "other.blob.core.windows.net:443",
    ];
    let mut differ = Vec::new();
    for t in targets {
        let ours = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&cfg.0)
            .arg(t)
            .output()
            .unwrap()
            .status
            .code();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes())
            .unwrap();
        let mut head = [0u8; 12];
        let _ = s.read_exact(&mut head);
        let refused_by_squid = &head[9..12] == b"403";
        let refused_by_us = ours == Some(1);
        if refused_by_squid != refused_by_us {
            differ.push(format!(
                "{t}: squid {}, aml-egress {}",
                String::from_utf8_lossy(&head),
                if refused_by_us { "deny" } else { "allow" }
            ));
        }
    }
    let _ = squid.kill();
    let _ = squid.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(differ.is_empty(), "{differ:#?}");
}
