//! `host:port` from the wire: parsing never panics, a parsed target prints back to a
//! string that parses to the same target, and the default policy decides every one.
#![no_main]

use std::sync::OnceLock;

use aml_egress::config::{Built, Settings, build_policy};
use aml_egress::policy::{PathView, Target};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        build_policy(&s).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let decision = policy().policy.decide_str(text, PathView::Hidden);
    if let Ok(t) = Target::parse(text) {
        let again = Target::parse(&t.to_string()).expect("a printed target parses");
        assert_eq!(again.to_string(), t.to_string());
        assert_eq!(policy().policy.decide(&again, PathView::Hidden), decision);
    } else {
        assert!(!decision.is_allowed());
    }
});
