//! Ways around the controls that keep data in (`catalog.narrow`,
//! `catalog.service_tags_nameless_tls`, `/allowed`) found in review, each held by a test:
//! a nameless TLS hello on any port of a tag, an empty `proxy.tls_ports`, a narrowed
//! wildcard under a wider one, two keys for one pattern, a refused name kept in `/allowed`,
//! an undecodable filter.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aml_egress::config;
use aml_egress::policy::PathView;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TempFile;
use support::net::{exchange, upstream};
use support::proxy::start_proxy;
use support::tls::{ACCESS_DENIED, crafted_hello};

/// A Service Tags file whose AzureMachineLearning and AzureActiveDirectory prefixes are
/// documentation ranges (the 2026-03 catalog allows the first on 443, 8787 and 18881, the
/// second on 80 and 443, with no optional part needed).
fn service_tags() -> TempFile {
    TempFile::new(
        "ServiceTags.json",
        r#"{"changeNumber":1,"cloud":"Public","values":[
  {"name":"AzureMachineLearning","id":"AzureMachineLearning","properties":{"region":"","addressPrefixes":["192.0.2.0/24"]}},
  {"name":"AzureActiveDirectory","id":"AzureActiveDirectory","properties":{"region":"","addressPrefixes":["198.51.100.0/24"]}}
]}"#,
    )
}

/// Build a config the way `serve` does: the policy, or the error text.
fn build(toml: &str) -> Result<config::Built, String> {
    let s = support::settings(toml).map_err(|e| e.to_string())?;
    config::compile(s)
        .map(|c| c.built)
        .map_err(|e| e.to_string())
}

/// An upstream that records every byte it is sent, and answers nothing.
async fn recorder() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let r = rec.clone();
    let addr = upstream(move |mut s: TcpStream| {
        let r = r.clone();
        async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                r.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }
    })
    .await;
    (addr, rec)
}

/// A TLS hello without a server name, through CONNECT to an address that only a service
/// tag's prefix allows, on a port of that tag that is not in `proxy.tls_ports` (8787 of
/// AzureMachineLearning; 80 of AzureActiveDirectory is the same). The proxy sees that the
/// tunnel carries TLS (it reads the hello) and still lets the nameless hello through on
/// the prefix alone: exactly the "reaches whatever tenant answers there" that
/// `catalog.service_tags_nameless_tls = "deny"` (the default) is meant to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nameless_hello_on_a_service_tag_port_outside_tls_ports_is_refused() {
    let tags = service_tags();
    let (rec_addr, rec) = recorder().await;
    let p = start_proxy(&format!(
        "[catalog]\nregion = \"westeurope\"\nservice_tags_file = {:?}\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"192.0.2.7:8787\" = \"{rec_addr}\", \"192.0.2.7:443\" = \"{rec_addr}\" }}\n",
        tags.0
    ))
    .await;
    // The control holds on 443 (tls_ports): refused before any tunnel.
    let (_s, resp) = exchange(p.addr, "CONNECT 192.0.2.7:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("service_tag_without_name"), "{resp}");
    // On 8787 the CONNECT is allowed (the tag's port, maybe not TLS), but what it carries
    // is a TLS hello without a name: it must not reach the address.
    let (mut s, resp) = exchange(p.addr, "CONNECT 192.0.2.7:8787 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let nameless = crafted_hello(&[], 0);
    s.write_all(&nameless).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    assert_eq!(
        got,
        ACCESS_DENIED,
        "a nameless TLS hello to a service tag's address was relayed (upstream got {} bytes)",
        rec.lock().unwrap().len()
    );
    assert!(
        rec.lock().unwrap().is_empty(),
        "the hello reached the address"
    );
}

/// `proxy.tls_ports = []` (a legal setting: every CONNECT port is then sniffed) silently
/// turns `catalog.service_tags_nameless_tls = "deny"` off: the set of nameless ports is
/// copied from tls_ports, so an address on 443 is allowed by the service tag's prefix again,
/// with no error and no warning.
#[test]
fn clearing_tls_ports_does_not_silently_turn_the_nameless_control_off() {
    let tags = service_tags();
    let toml = format!(
        "[proxy]\ntls_ports = []\n[catalog]\nregion = \"westeurope\"\nservice_tags_file = {:?}\n",
        tags.0
    );
    let Ok(b) = build(&toml) else {
        return; // refused: fine
    };
    let d = b.policy.decide_str("192.0.2.7:443", PathView::Hidden);
    let warned = b
        .warnings
        .iter()
        .any(|w| w.contains("service_tags_nameless_tls"));
    assert!(
        !d.is_allowed() || warned,
        "192.0.2.7:443 allowed by a service tag's prefix with service_tags_nameless_tls = \"deny\", and no warning: {}",
        b.policy.explain("192.0.2.7:443", &d)
    );
}

/// The default catalog has nested wildcards: `*.azureml.ms` over `*.instances.azureml.ms`
/// (compute instances, anyone's), `*.azureml.net` over `*.instances.azureml.net` and
/// `*.modelmanagement.azureml.net`, `*.<region>.batch.azure.com` over
/// `*.<region>.service.batch.azure.com`. Narrowing the inner one is accepted without a word,
/// and narrows nothing: every name under it is still allowed by the outer wildcard. The
/// names observed under the inner pattern (what `suggest --narrow` turns into a key) are
/// exactly those.
#[test]
fn narrowing_a_wildcard_that_a_wider_one_covers_is_not_silently_ineffective() {
    let toml = "[catalog]\nregion = \"westeurope\"\n[catalog.narrow]\n\"*.instances.azureml.ms\" = [\"ci1.westeurope.instances.azureml.ms\"]\n";
    let Ok(b) = build(toml) else {
        return; // refused: fine
    };
    let ok = b
        .policy
        .decide_str("ci1.westeurope.instances.azureml.ms:443", PathView::Hidden);
    assert!(ok.is_allowed());
    let t = "attacker.westeurope.instances.azureml.ms:443";
    let d = b.policy.decide_str(t, PathView::Hidden);
    let warned = b
        .warnings
        .iter()
        .any(|w| w.contains("*.instances.azureml.ms") && w.contains("*.azureml.ms"));
    assert!(
        !d.is_allowed() || warned,
        "{t} still allowed ({}) although *.instances.azureml.ms is narrowed, and no warning says so",
        b.policy.explain(t, &d)
    );
}

/// Two keys of `catalog.narrow` that name the same pattern (case, a trailing dot): both are
/// accepted, and the second one's names are silently ignored (the first wins in the policy,
/// in `catalog` and in the exports). Refuse the config, or honour both lists.
#[test]
fn two_narrow_keys_for_one_pattern_are_refused_or_both_honoured() {
    let toml = "[catalog]\nregion = \"westeurope\"\nstorage_account = \"amlstore\"\n[catalog.narrow]\n\"*.BLOB.core.windows.net\" = [\"a.blob.core.windows.net\"]\n\"*.blob.core.windows.net.\" = [\"b.blob.core.windows.net\"]\n";
    let Ok(b) = build(toml) else {
        return; // refused: fine
    };
    for t in ["a.blob.core.windows.net:443", "b.blob.core.windows.net:443"] {
        let d = b.policy.decide_str(t, PathView::Hidden);
        assert!(
            d.is_allowed(),
            "{t}: {} (the config was accepted with both keys)",
            b.policy.explain(t, &d)
        );
    }
}

/// A wildcard config with both names pinned to an unanswering address (the decision is
/// recorded before the dial), and `narrow` appended.
fn observed(narrow: &str) -> String {
    format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\ntls_ports = []\nopaque_ports = [443]\n[admin]\nlisten = \"127.0.0.1:0\"\n[[allow]]\nhost = \"*.blob.test\"\nports = [443]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"acct1.blob.test:443\" = \"127.0.0.1:9\", \"attacker.blob.test:443\" = \"127.0.0.1:9\" }}\n{narrow}"
    )
}

/// After the operator narrows a wildcard and reloads, a name the policy now refuses stays
/// in `/allowed` under that pattern (and in the gauge), so the next `suggest --narrow`
/// (the documented way to refresh the table, e.g. when a new account is needed) suggests
/// it again: regenerating the table re-opens the very name the operator left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_narrowing_refuses_is_not_kept_in_allowed_after_the_reload() {
    use aml_egress::reload::Trigger;
    let cfg = TempFile::new("observed.toml", &observed(""));
    let p = support::proxy::start_file(&cfg.0).await;
    for n in ["acct1.blob.test", "attacker.blob.test"] {
        let (_s, resp) = exchange(p.addr, &format!("CONNECT {n}:443 HTTP/1.1\r\n\r\n")).await;
        assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    }
    std::fs::write(
        &cfg.0,
        observed("[catalog.narrow]\n\"*.blob.test\" = [\"acct1.blob.test\"]\n"),
    )
    .unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    let (_s, resp) = exchange(p.addr, "CONNECT attacker.blob.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let (_, body) = support::net::get(p.admin_addr, "/allowed", None).await;
    let rows: Vec<aml_egress::allowed::AllowedReport> = serde_json::from_str(&body).unwrap();
    let mut o =
        aml_egress::suggest::narrow::Observed::new(aml_egress::suggest::narrow::Counted::Allowed);
    o.add_reports(&rows);
    let table = o.render();
    assert!(
        !table.contains("\"attacker.blob.test\""),
        "suggest --narrow after the narrowing reload lists the refused name again:\n{table}"
    );
}

/// `/allowed?rule=` with a value that does not decode to UTF-8 is treated as no filter at
/// all: every row is served, where a filter matching nothing (or a 400) is expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_rule_filter_does_not_return_every_row() {
    let p = start_proxy(&observed("")).await;
    let (_s, resp) = exchange(p.addr, "CONNECT acct1.blob.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    let (_, all) = support::net::get(p.admin_addr, "/allowed", None).await;
    assert!(all.contains("acct1.blob.test"), "{all}");
    let (status, body) = support::net::get(p.admin_addr, "/allowed?rule=%ff", None).await;
    assert!(
        status == 400 || !body.contains("acct1.blob.test"),
        "{status} {body}"
    );
}
