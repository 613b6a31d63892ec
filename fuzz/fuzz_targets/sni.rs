//! The ClientHello parser on the first bytes of a tunnel: never panics, and a name it
//! returns is a valid host name.
#![no_main]

use aml_egress::policy::Target;
use aml_egress::proxy::sni::server_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(name)) = server_name(data) {
        assert!(Target::parse(&format!("{}:443", name.as_str())).is_ok());
    }
});
