//! The host a request names inside a tunnel or on the transparent HTTP listener (its
//! authority or `Host`, judged against the port it arrived for): never panics, and a host
//! it accepts is on that port and parses back as a target.
#![no_main]

use aml_egress::policy::Target;
use aml_egress::proxy::forward::host::{Named, named};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((port, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let port = u16::from_be_bytes(*port).max(1);
    if let Named::Host(t) = named(Some(rest), port) {
        assert_eq!(t.port, port);
        assert_eq!(Target::parse(&t.to_string()), Ok(t));
    }
});
