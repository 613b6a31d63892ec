//! Deployment: the systemd unit (`systemd-analyze verify` and `security`), the notify
//! protocol seen from systemd's side, `aml-egress health` for container health checks, and
//! `proxy.shutdown_delay_secs` (not ready at once on SIGTERM, still accepting for a while).

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::TempFile;

const BIN: &str = env!("CARGO_BIN_EXE_aml-egress");
const UNIT: &str = include_str!("../systemd/aml-egress.service");

fn systemd_analyze() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "CI installs systemd for systemd-analyze"
        );
        eprintln!("skipped: systemd-analyze is not installed");
    }
    found
}

#[test]
fn the_unit_verifies_and_its_exposure_is_at_most_2() {
    if !systemd_analyze() {
        return;
    }
    // Type=notify: the proxy tells systemd when it is ready.
    assert!(UNIT.contains("Type=notify"));
    // `verify` checks that ExecStart exists: point it at the binary built here.
    let dir = std::env::temp_dir().join(format!("aml-egress-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("aml-egress.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/aml-egress", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("aml-egress.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level}:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The binary serving `toml`, killed when dropped.
struct Serving {
    child: Child,
    proxy: String,
    admin: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(toml: &str, notify: Option<&std::path::Path>) -> (Serving, TempFile) {
    let cfg = TempFile::new("deploy.toml", toml);
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(&cfg.0)
        .env_remove("AML_EGRESS_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stderr(Stdio::piped());
    if let Some(path) = notify {
        cmd.env("NOTIFY_SOCKET", path);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "aml-egress serving" {
            let listen = v["fields"]["listen"].as_str().unwrap_or_default();
            let proxy = listen.trim_matches(['[', ']']).to_owned();
            let admin = v["fields"]["admin"].as_str().unwrap_or_default().to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return (
                Serving {
                    child,
                    proxy,
                    admin,
                },
                cfg,
            );
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the proxy exited before serving");
}

fn datagram(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = sock
        .recv(&mut buf)
        .expect("a notification before the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn systemd_hears_ready_once_the_listener_accepts_and_stopping_on_sigterm() {
    let path = std::env::temp_dir().join(format!("aml-egress-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    // A bound on a hang, not a speed measurement.
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (p, _cfg) = serve(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        Some(&path),
    );
    assert_eq!(datagram(&sock), "READY=1\n");
    std::net::TcpStream::connect(&p.proxy).expect("the listener accepts once READY=1 is sent");
    let ok = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(datagram(&sock), "STOPPING=1\n");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn health_says_ready_then_not_ready_during_the_shutdown_delay_while_still_accepting() {
    let health = |admin: &str| {
        let out = Command::new(BIN)
            .args(["health", "--admin", &format!("http://{admin}")])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (p, _cfg) = serve(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nshutdown_delay_secs = 60\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        None,
    );
    let (code, text) = health(&p.admin);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("ready"), "{text}");
    assert!(
        Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // Not ready at once (503)...
    let code = loop {
        let (code, text) = health(&p.admin);
        if code != 0 {
            assert!(text.starts_with("not ready"), "{text}");
            break code;
        }
    };
    assert_eq!(code, 1, "never 2, which Docker reserves");
    // ...while a new connection is still answered.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&p.proxy).unwrap();
    s.write_all(b"CONNECT denied.example.net:443 HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut got = [0u8; 12];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HTTP/1.1 403");
    // Nothing listening: not ready either.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, text) = health(&closed.to_string());
    assert_eq!(code, 1, "{text}");
}

/// The TOML a manifest's ConfigMap holds, between its begin and end markers, dedented.
fn embedded_config(manifest: &str) -> String {
    let start = manifest.find("# config.toml begins").expect("begin marker");
    let end = manifest.find("# config.toml ends").expect("end marker");
    manifest[start..end]
        .lines()
        .skip(1)
        .map(|l| l.trim_start())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_use_keys_ports_and_paths_the_product_has() {
    let token = TempFile::new("token", "0123456789abcdef0123456789abcdef");
    for (name, manifest) in [
        ("gateway", include_str!("../deploy/kubernetes/gateway.yaml")),
        ("sidecar", include_str!("../deploy/kubernetes/sidecar.yaml")),
    ] {
        let toml = embedded_config(manifest)
            .replace("/var/run/aml-egress/admin/token", token.0.to_str().unwrap());
        let s = support::settings(&toml).unwrap_or_else(|e| panic!("{name}: {e}"));
        let admin = s.admin.listen.expect("an admin listener");
        assert!(
            manifest.contains(&format!("containerPort: {}", admin.port())),
            "{name}: the admin port"
        );
        if name == "gateway" {
            let proxy = s.proxy.listen[0].port();
            assert!(
                manifest.contains(&format!("containerPort: {proxy}")),
                "{name}"
            );
            assert!(
                manifest.contains(&format!("value: http://127.0.0.1:{proxy}"))
                    || manifest.contains("port: 3128"),
                "{name}: the proxy port"
            );
        }
        for line in manifest
            .lines()
            .filter(|l| l.trim_start().starts_with("path: "))
        {
            let path = line.trim_start().trim_start_matches("path: ");
            assert!(["/healthz", "/readyz"].contains(&path), "{name}: {path}");
        }
    }
    assert!(
        include_str!("../deploy/kubernetes/sidecar.yaml").contains("value: http://127.0.0.1:3128")
    );
    // The paths the probes and the scrape use are answered.
    let p = support::proxy::start_proxy("").await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = support::net::get(p.admin_addr, path, None).await;
        assert_eq!(status, 200, "{path}");
    }
    assert!(include_str!("../deploy/kubernetes/prometheus-scrape.yml").contains("port: 9464"));
    // The container's own configuration is valid as shipped.
    support::settings(include_str!("../config/docker.toml")).unwrap();
}

#[test]
fn the_appliance_cloud_init_holds_a_valid_configuration() {
    let cloud_init = include_str!("../deploy/azure/cloud-init.yaml");
    let start = cloud_init.find("[catalog]").expect("a configuration");
    let end = cloud_init.find("  - path: /etc/sysctl.d").expect("its end");
    let token = TempFile::new("token", "0123456789abcdef0123456789abcdef");
    let toml: String = cloud_init[start..end]
        .lines()
        .map(|l| l.trim_start())
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/etc/aml-egress/admin-token", token.0.to_str().unwrap());
    let s = support::settings(&toml).unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.transparent.tls_listen.is_empty());
    // The load balancer's probe port is the admin port.
    let admin = s.admin.listen.expect("an admin listener").port();
    assert!(
        include_str!("../deploy/azure/scale-set.sh")
            .contains(&format!("--port {admin} --path /readyz"))
    );
}

#[test]
fn the_dashboard_imports_with_one_prometheus_input_and_panels_that_do_not_overlap() {
    let d: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/aml-egress.json")).unwrap();
    let inputs = d["__inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1);
    assert_eq!(
        (&inputs[0]["name"], &inputs[0]["pluginId"]),
        (
            &serde_json::json!("DS_PROMETHEUS"),
            &serde_json::json!("prometheus")
        )
    );
    // Every data source anywhere (panels, queries, variables) is that input, but Grafana's
    // own for its built-in annotations.
    fn sources<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(ds) = m.get("datasource") {
                    out.push(ds);
                }
                m.values().for_each(|v| sources(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| sources(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    sources(&d, &mut found);
    assert!(found.len() > 20);
    for ds in found.into_iter().filter(|ds| ds["type"] != "grafana") {
        assert_eq!(ds["uid"], "${DS_PROMETHEUS}", "{ds}");
    }
    // Unique ids, and no two panels on the same cells of the 24-column grid.
    let panels = d["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut cells = std::collections::BTreeMap::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "id {}", p["id"]);
        let g = &p["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| g[k].as_u64().unwrap());
        assert!(x + w <= 24, "{}", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), p["title"].clone()) {
                    panic!("{} overlaps {other}", p["title"]);
                }
            }
        }
    }
    // The names under each wildcard: a graph per rule and a table.
    let wildcard: Vec<&str> = panels
        .iter()
        .filter(|p| p.to_string().contains("aml_egress_wildcard_names"))
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(wildcard, ["timeseries", "table"]);
}
