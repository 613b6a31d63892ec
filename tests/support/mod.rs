//! Shared helpers for the integration tests: temporary config files and policies built
//! exactly as the binary builds them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use aml_egress::config::{self, Built, Compiled, ConfigError, Settings};

pub mod clients;
pub mod dns;
pub mod net;
pub mod netns;
pub mod peers;
pub mod proxy;
pub mod tls;

/// A file in a per-process temporary folder, removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("aml-egress-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Load settings from TOML text with an empty environment (so that the developer's own
/// `AML_EGRESS__*` variables cannot change a test's outcome).
pub fn settings(toml: &str) -> Result<Settings, ConfigError> {
    settings_env(toml, &[])
}

/// Load settings from TOML text plus the given environment variables.
pub fn settings_env(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let file = TempFile::new("config.toml", toml);
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_with_env(Some(&file.0), Some(env))
}

/// Compile a config exactly as `serve` does, panicking with the error text when it is
/// invalid.
pub fn compiled(toml: &str) -> Compiled {
    let s = settings(toml).unwrap_or_else(|e| panic!("{e}"));
    config::compile(s).unwrap_or_else(|e| panic!("{e}"))
}

/// The compiled policy of a config.
pub fn built(toml: &str) -> Built {
    compiled(toml).built
}

/// Build and report every problem as one string.
pub fn build_error(toml: &str) -> String {
    match settings(toml) {
        Err(e) => e.to_string(),
        Ok(s) => match config::compile(s) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected the config to be refused:\n{toml}"),
        },
    }
}
