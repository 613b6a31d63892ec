//! Real clients and their settings for the proxy tests: `curl`, the upstream pins the
//! configs use, and a certificate for the proxy's own TLS listener.

use std::net::SocketAddr;
use std::process::Command;

use super::TempFile;

pub fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--noproxy", ""])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn curl_async(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&a)
    })
    .await
    .unwrap()
}

pub fn pins(http: SocketAddr, tls: SocketAddr) -> String {
    format!(
        r#"
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "login.microsoftonline.com:443" = "{tls}", "pypi.org:80" = "{http}", "raw.githubusercontent.com:80" = "{http}" }}
"#
    )
}

/// A certificate for the proxy's own TLS listener (for 127.0.0.1): the key pair, its
/// files, and the `[proxy]` lines that use them.
pub struct ProxyCert {
    pub ck: rcgen::CertifiedKey<rcgen::KeyPair>,
    pub cert: TempFile,
    pub _key: TempFile,
    pub keys: String,
}

pub fn proxy_cert() -> ProxyCert {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = TempFile::new("proxy.pem", &ck.cert.pem());
    let key = TempFile::new("proxy.key", &ck.signing_key.serialize_pem());
    let keys = format!(
        "tls_listen = [\"127.0.0.1:0\"]\ntls_cert = {:?}\ntls_key = {:?}\n",
        cert.0, key.0
    );
    ProxyCert {
        ck,
        cert,
        _key: key,
        keys,
    }
}

/// The aml-egress binary run with `args`, off the async runtime (so that a proxy serving
/// on the same runtime can answer it): its output.
pub async fn aml_async(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_aml-egress"))
            .args(&args)
            .env_remove("AML_EGRESS_LOG")
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap()
}
