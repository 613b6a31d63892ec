//! Host patterns from configuration files: parsing never panics on any text.
#![no_main]

use aml_egress::policy::parse_pattern;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_pattern(text);
    }
});
