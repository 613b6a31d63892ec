//! Network namespaces for the tests that need a firewall: whether this machine can make
//! them, and running the commands that do.

use std::process::Command;

/// Run a command; panic with its output when it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this machine can run the test; otherwise why not.
pub fn unable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Skip (outside CI, with the reason printed) or fail (in CI) when the machine cannot run
/// a namespace test; `true` means go on.
pub fn able() -> bool {
    let Some(why) = unable() else {
        return true;
    };
    assert!(
        std::env::var("CI").is_err(),
        "CI must run the namespace tests: {why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// A namespace of its own, removed when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(prefix: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}{}{}",
            std::process::id() % 10_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
