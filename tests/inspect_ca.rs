//! The inspection CA (issue 20, first slice): `aml-egress ca init` and `ca show` as an
//! operator runs them, the `[inspect]` settings' load-time checks, and real clients (curl,
//! `openssl verify`) refusing a certificate the CA signed outside its name constraints.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aml_egress::policy::TlsPathRules;
use tokio::io::AsyncWriteExt;

use support::TempFile;
use support::clients::curl_async;
use support::net::{read_request_head, upstream};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aml-egress"));
    // The developer's own overrides must not leak into the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("AML_EGRESS__") {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A folder of its own under the system's temporary folder, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "aml-egress-ca-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path rule on 443, a wildcard in `inspect.hosts`, and a bypassed name.
const INSPECTING: &str = r#"
[[allow]]
host = "files.example.test/pkg/*"
ports = [443]
[[allow]]
host = "*.inspected.test"
ports = [443]
[inspect]
hosts = ["*.inspected.test"]
bypass = ["pinned.example.test"]
"#;

/// `ca init` into `dir/ca` for the configuration `toml`; its output.
fn ca_init(dir: &Dir, toml: &str, extra: &[&str]) -> Output {
    std::fs::write(dir.path("config.toml"), toml).unwrap();
    let (out, config) = (dir.s("ca"), dir.s("config.toml"));
    let mut args = vec!["ca", "init", "--out", &out, "--config", &config];
    args.extend_from_slice(extra);
    run(&args)
}

/// `toml` with `[inspect]`'s CA keys pointing at `dir/ca` (appended to its `[inspect]`
/// table, which must come last).
fn with_ca(dir: &Dir, toml: &str) -> String {
    format!(
        "{toml}ca_cert = {:?}\nca_key = {:?}\n",
        dir.s("ca/ca.pem"),
        dir.s("ca/ca.key")
    )
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)")
}

/// The value after `label: ` on a line of `out`.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no {label} in:\n{out}"))
}

#[test]
fn ca_init_writes_a_p256_ca_whose_critical_name_constraints_permit_only_the_inspected_names() {
    let dir = Dir::new("init");
    let out = ca_init(&dir, INSPECTING, &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let mode = std::fs::metadata(dir.path("ca/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "ca.key mode {mode:o}");
    assert!(dir.path("ca/ca.pem").is_file());

    let x = openssl(&["x509", "-in", &dir.s("ca/ca.pem"), "-noout", "-text"]);
    let x = text(&x.stdout);
    for expected in [
        "X509v3 Name Constraints: critical",
        "DNS:.inspected.test",
        "DNS:files.example.test",
        "IP:0.0.0.0/0.0.0.0",
        "IP:0:0:0:0:0:0:0:0/0:0:0:0:0:0:0:0",
        "CA:TRUE, pathlen:0",
        "Certificate Sign, CRL Sign",
        "ASN1 OID: prime256v1",
        "Subject: CN = aml-egress inspection CA (",
    ] {
        assert!(x.contains(expected), "{expected} missing from:\n{x}");
    }
    // Only those two DNS subtrees: a bypassed name is not permitted.
    assert_eq!(x.matches("DNS:").count(), 2, "{x}");
    assert!(!x.contains("pinned"), "{x}");

    // What init printed: the subtrees, the fingerprint openssl computes, the next steps.
    assert!(
        stdout.contains(
            "permitted DNS .inspected.test, files.example.test; excluded IP 0.0.0.0/0, ::/0"
        ),
        "{stdout}"
    );
    let fp = openssl(&[
        "x509",
        "-in",
        &dir.s("ca/ca.pem"),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    let fp = text(&fp.stdout);
    let fp = fp.trim().rsplit('=').next().unwrap();
    assert_eq!(field(&stdout, "SHA-256 fingerprint"), fp);
    assert!(
        field(&stdout, "expires").ends_with("(730 days left)"),
        "{stdout}"
    );
    assert!(stdout.contains("ca_cert = "), "{stdout}");
    assert!(stdout.contains("aml-egress ca show"), "{stdout}");

    // Existing files are kept unless --force.
    let again = ca_init(&dir, INSPECTING, &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    let forced = ca_init(&dir, INSPECTING, &["--force", "--days", "10"]);
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced.stderr));
    assert_ne!(field(&text(&forced.stdout), "SHA-256 fingerprint"), fp);
}

/// A TLS server on loopback presenting `leaf` (PEM) for its key, answering `hello`.
async fn serve_leaf(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> std::net::SocketAddr {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    upstream(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            if read_request_head(&mut tls).await.is_none() {
                return;
            }
            let resp = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello\n";
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
    .await
}

/// A leaf certificate for `name`, signed with the CA's own files as `ca init` wrote them.
fn leaf(dir: &Dir, name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path("ca/ca.key")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(dir.path("ca/ca.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert, key)
}

#[tokio::test]
async fn clients_refuse_a_leaf_the_ca_signs_outside_its_name_constraints() {
    let dir = Dir::new("clients");
    let out = ca_init(&dir, INSPECTING, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ca = dir.s("ca/ca.pem");
    for (name, permitted) in [
        ("files.example.test", true),
        ("a.inspected.test", true),
        ("a.b.inspected.test", true),
        ("evil.example.org", false),
        ("pinned.example.test", false),
        // `.inspected.test` permits its subdomains, not the name itself.
        ("inspected.test", false),
    ] {
        let (cert, key) = leaf(&dir, name);
        let addr = serve_leaf(&cert, &key).await;
        let url = format!("https://{name}:{}/", addr.port());
        let resolve = format!("{name}:{}:127.0.0.1", addr.port());
        let (code, body, err) = curl_async(vec![
            "--cacert".into(),
            ca.clone(),
            "--resolve".into(),
            resolve,
            url,
        ])
        .await;
        if permitted {
            assert_eq!((code, body.as_str()), (0, "hello\n"), "{name}: {err}");
        } else {
            // 60: the peer's certificate cannot be verified, for the name constraints.
            assert_eq!(code, 60, "{name} was accepted: {body}{err}");
            assert!(err.contains("subtree violation"), "{name}: {err}");
        }
        // A second client: openssl's own chain verification.
        let leaf_file = dir.path(&format!("{name}.pem"));
        std::fs::write(&leaf_file, cert.pem()).unwrap();
        let v = openssl(&["verify", "-CAfile", &ca, &leaf_file.display().to_string()]);
        let said = text(&v.stdout) + &text(&v.stderr);
        if permitted {
            assert!(v.status.success(), "{name}: {said}");
        } else {
            assert!(!v.status.success(), "{name} verified: {said}");
            assert!(
                said.contains("permitted subtree violation")
                    || said.contains("excluded subtree violation"),
                "{name}: {said}"
            );
        }
    }
}

#[test]
fn a_configuration_that_inspects_nothing_gets_no_constrained_ca() {
    let dir = Dir::new("nothing");
    let toml = "[[allow]]\nhost = \"plain.example.test/x/*\"\nports = [80]\n";
    let out = ca_init(&dir, toml, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("inspects nothing")
            && err.contains("add inspect.hosts or a path rule")
            && err.contains("--unconstrained"),
        "{err}"
    );
    assert!(!dir.path("ca/ca.key").exists() && !dir.path("ca/ca.pem").exists());

    let out = ca_init(&dir, toml, &["--unconstrained"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("any name"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("name constraints: none: unconstrained"),
        "{}",
        text(&out.stdout)
    );
    let x = text(&openssl(&["x509", "-in", &dir.s("ca/ca.pem"), "-noout", "-text"]).stdout);
    assert!(!x.contains("Name Constraints"), "{x}");
    assert!(x.contains("CA:TRUE, pathlen:0"), "{x}");
}

#[test]
fn the_ca_key_must_be_its_owners_alone_or_roots_and_its_groups() {
    let dir = Dir::new("mode");
    assert_eq!(ca_init(&dir, INSPECTING, &[]).status.code(), Some(0));
    let key = dir.path("ca/ca.key");
    let cfg = TempFile::new("inspect.toml", &with_ca(&dir, INSPECTING));
    // Owned by root, group-readable: how a Kubernetes Secret with fsGroup arrives.
    if std::fs::metadata(&key).unwrap().uid() == 0 {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
        let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("(mode 0644)"));
        // Anyone else's key must be its owner's alone.
        std::os::unix::fs::chown(&key, Some(65532), Some(65532)).unwrap();
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("inspect.ca_key"), "{err}");
    assert!(err.contains("open to group or others (mode 0640)"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
    assert_no_key(&dir, &err);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn ca_cert_and_ca_key_are_given_together_or_not_at_all() {
    let dir = Dir::new("pair");
    assert_eq!(ca_init(&dir, INSPECTING, &[]).status.code(), Some(0));
    for (given, missing) in [("ca_cert", "ca_key"), ("ca_key", "ca_cert")] {
        let file = if given == "ca_cert" {
            "ca/ca.pem"
        } else {
            "ca/ca.key"
        };
        let toml = format!("{INSPECTING}{given} = {:?}\n", dir.s(file));
        let cfg = TempFile::new("half.toml", &toml);
        let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "inspect.{missing}: inspect.ca_cert and inspect.ca_key go together"
            )),
            "{err}"
        );
    }
    // An [inspect] table without a CA is valid and inspects nothing.
    let cfg = TempFile::new("no-ca.toml", INSPECTING);
    let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains("TLS inspection: off (inspect.ca_cert is not set); with a CA, inspected: 2"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_configuration_inspecting_a_name_the_ca_does_not_permit_does_not_load() {
    let dir = Dir::new("outside");
    assert_eq!(ca_init(&dir, INSPECTING, &[]).status.code(), Some(0));
    let wider = INSPECTING.replace(
        "hosts = [\"*.inspected.test\"]",
        "hosts = [\"*.inspected.test\", \"other.example.test\"]",
    );
    let cfg = TempFile::new("wider.toml", &with_ca(&dir, &wider));
    // What serve and every reload call.
    let err = aml_egress::config::load(Some(&cfg.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "do not permit other.example.test, which this configuration inspects (inspect.hosts)"
        ),
        "{err}"
    );
    assert!(err.contains("aml-egress ca init --config"), "{err}");
    assert!(
        err.contains("add other.example.test to inspect.bypass"),
        "{err}"
    );
    let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("other.example.test"),
        "{}",
        text(&out.stderr)
    );
    // Bypassing it, or a CA made for the new file, loads.
    let bypassed = wider.replace(
        "bypass = [\"pinned.example.test\"]",
        "bypass = [\"pinned.example.test\", \"other.example.test\"]",
    );
    let cfg = TempFile::new("bypassed.toml", &with_ca(&dir, &bypassed));
    aml_egress::config::load(Some(&cfg.0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ca_init(&dir, &wider, &["--force"]).status.code(), Some(0));
    let cfg = TempFile::new("wider.toml", &with_ca(&dir, &wider));
    aml_egress::config::load(Some(&cfg.0)).unwrap_or_else(|e| panic!("{e}"));
}

/// Neither the key's PEM nor any line of its base64 body is in `said`.
fn assert_no_key(dir: &Dir, said: &str) {
    let key = std::fs::read_to_string(dir.path("ca/ca.key")).unwrap();
    assert!(!said.contains("PRIVATE KEY"), "{said}");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!said.contains(line), "the key is shown: {said}");
    }
}

#[test]
fn ca_show_prints_the_fingerprint_and_how_to_install_it_never_the_key() {
    let dir = Dir::new("show");
    let init = ca_init(&dir, INSPECTING, &[]);
    assert_eq!(init.status.code(), Some(0));
    let fp = field(&text(&init.stdout), "SHA-256 fingerprint").to_owned();
    let cfg = TempFile::new("show.toml", &with_ca(&dir, INSPECTING));
    let by_config = run(&["ca", "show", "--config", cfg.0.to_str().unwrap()]);
    let by_cert = run(&["ca", "show", "--cert", &dir.s("ca/ca.pem")]);
    for out in [&by_config, &by_cert] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert_eq!(field(&stdout, "SHA-256 fingerprint"), fp);
        assert!(field(&stdout, "subject").starts_with("CN=aml-egress inspection CA ("));
        assert!(field(&stdout, "expires").contains("days left"), "{stdout}");
        assert_eq!(
            field(&stdout, "name constraints (critical)"),
            "permitted DNS .inspected.test, files.example.test; excluded IP 0.0.0.0/0, ::/0"
        );
        for command in [
            "cp ca.pem /usr/local/share/ca-certificates/aml-egress.crt && update-ca-certificates",
            "REQUESTS_CA_BUNDLE=",
            "PIP_CERT=",
            "SSL_CERT_FILE=",
            "conda config --set ssl_verify",
            "keytool -importcert",
            "NODE_EXTRA_CA_CERTS=",
            "git config --global http.sslCAInfo",
            "\"$(python -m certifi)\"",
        ] {
            assert!(
                stdout.contains(command),
                "{command} missing from:\n{stdout}"
            );
        }
        assert_no_key(&dir, &(stdout + &text(&out.stderr)));
    }
    assert!(
        text(&by_config.stdout).contains("every inspected name is permitted (2)"),
        "{}",
        text(&by_config.stdout)
    );
    // Nor does anything that may be logged: the compiled configuration's Debug form.
    let compiled = aml_egress::config::load(Some(&cfg.0)).unwrap();
    assert_no_key(&dir, &format!("{compiled:?}"));
    let none = run(&["ca", "show"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        text(&none.stderr).contains("--cert FILE"),
        "{}",
        text(&none.stderr)
    );
}

#[test]
fn validate_says_what_is_inspected_and_why_and_warns_of_a_path_rule_over_a_bypassed_name() {
    let dir = Dir::new("validate");
    let toml = INSPECTING.replace(
        "[inspect]",
        "[[allow]]\nhost = \"pinned.example.test/api/*\"\nports = [443]\n[inspect]",
    );
    assert_eq!(
        ca_init(&dir, &toml, &["--days", "10"]).status.code(),
        Some(0)
    );
    let cfg = TempFile::new("validate.toml", &with_ca(&dir, &toml));
    let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("TLS inspection: on, CA {}", dir.s("ca/ca.pem"))),
        "{stdout}"
    );
    assert!(stdout.contains("inspected: 2\n"), "{stdout}");
    assert!(
        stdout.contains("  - files.example.test: path rule files.example.test/pkg/* port 443 (config [[allow]] #1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  - *.inspected.test: inspect.hosts"),
        "{stdout}"
    );
    assert!(
        stdout.contains("never inspected (inspect.bypass): pinned.example.test"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pinned.example.test/api/* port 443 (config [[allow]] #3) restricts a path over a name inspect.bypass holds (pinned.example.test): there it cannot be enforced over TLS"),
        "{stdout}"
    );
    // Within 30 days of its expiry the CA is a warning, not an error.
    assert!(stdout.contains("expires in 10 days"), "{stdout}");
}

#[test]
fn tls_path_rules_becomes_inspect_with_a_ca_unless_the_file_says_otherwise() {
    let dir = Dir::new("flip");
    assert_eq!(ca_init(&dir, INSPECTING, &[]).status.code(), Some(0));
    let default = support::settings(INSPECTING).unwrap();
    assert_eq!(default.policy.tls_path_rules, TlsPathRules::Widen);
    let with = support::settings(&with_ca(&dir, INSPECTING)).unwrap();
    assert_eq!(with.policy.tls_path_rules, TlsPathRules::Inspect);
    let explicit = format!(
        "[policy]\ntls_path_rules = \"widen\"\n{}",
        with_ca(&dir, INSPECTING)
    );
    assert_eq!(
        support::settings(&explicit).unwrap().policy.tls_path_rules,
        TlsPathRules::Widen
    );

    // What check says: decided on the path of an inspected https:// URL with inspect (a
    // bare host:port has no path to decide: refused), widened with an explicit widen.
    let check_one = |toml: &str, target: &str| {
        let cfg = TempFile::new("check.toml", toml);
        text(
            &run(&[
                "check",
                "--json",
                "--config",
                cfg.0.to_str().unwrap(),
                target,
            ])
            .stdout,
        )
    };
    let check = |toml: &str| check_one(toml, "https://files.example.test/pkg/x");
    let inspect = check(&with_ca(&dir, INSPECTING));
    assert!(
        inspect.contains("\"reason\":\"rule\"") && inspect.contains("(inspected)"),
        "{inspect}"
    );
    let bare = check_one(&with_ca(&dir, INSPECTING), "files.example.test:443");
    assert!(bare.contains("\"reason\":\"path_hidden_by_tls\""), "{bare}");
    assert!(
        bare.contains("policy.tls_path_rules = \\\"inspect\\\""),
        "{bare}"
    );
    let widen = check(&explicit);
    assert!(widen.contains("\"reason\":\"rule_widened\""), "{widen}");
    let plain = check(INSPECTING);
    assert!(plain.contains("\"reason\":\"rule_widened\""), "{plain}");
}

#[test]
fn the_ca_must_be_a_ca_and_the_key_its_own() {
    let dir = Dir::new("notca");
    assert_eq!(ca_init(&dir, INSPECTING, &[]).status.code(), Some(0));
    let other = Dir::new("notca-other");
    assert_eq!(ca_init(&other, INSPECTING, &[]).status.code(), Some(0));
    // Another CA's key.
    let toml = format!(
        "{INSPECTING}ca_cert = {:?}\nca_key = {:?}\n",
        dir.s("ca/ca.pem"),
        other.s("ca/ca.key")
    );
    let err = support::build_error(&toml);
    assert!(err.contains("inspect.ca_key"), "{err}");
    assert!(err.contains("does not belong to inspect.ca_cert"), "{err}");
    // A leaf is not a CA.
    let (cert, key) = leaf(&dir, "a.inspected.test");
    std::fs::write(dir.path("leaf.pem"), cert.pem()).unwrap();
    let key_path: &Path = &dir.path("leaf.key");
    std::fs::write(key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let toml = format!(
        "{INSPECTING}ca_cert = {:?}\nca_key = {:?}\n",
        dir.s("leaf.pem"),
        dir.s("leaf.key")
    );
    let err = support::build_error(&toml);
    assert!(err.contains("inspect.ca_cert"), "{err}");
    assert!(err.contains("not a CA certificate"), "{err}");
}

#[test]
fn upstream_trust_anchors_are_read_at_load() {
    let dir = Dir::new("anchors");
    assert_eq!(ca_init(&dir, INSPECTING, &[]).status.code(), Some(0));
    let good = format!("{INSPECTING}upstream_ca_file = {:?}\n", dir.s("ca/ca.pem"));
    let c = support::compiled(&good);
    assert_eq!(c.inspect.upstream_roots.len(), 1);
    std::fs::write(dir.path("notes.txt"), "not a certificate\n").unwrap();
    let bad = format!("{INSPECTING}upstream_ca_file = {:?}\n", dir.s("notes.txt"));
    let err = support::build_error(&bad);
    assert!(
        err.contains("inspect.upstream_ca_file")
            && err.contains("no certificate in it could be read"),
        "{err}"
    );
}
