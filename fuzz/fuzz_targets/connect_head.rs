//! The first request head as the proxy reads it itself: `plain_connect` never panics, and
//! when it takes a head, httparse agrees it is a complete `CONNECT` of that length whose
//! target is the range it names, a `host:port` the policy can be asked about.
#![no_main]

use aml_egress::proxy::head::plain_connect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(head) = plain_connect(data) else {
        return;
    };
    assert!(head.len <= data.len());
    assert!(head.target.end <= head.len);
    let target = std::str::from_utf8(&data[head.target.clone()]).expect("an ASCII target");
    assert!(!target.is_empty() && !target.contains(['/', ' ', '\r', '\n']), "{target:?}");
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    assert_eq!(req.parse(data).ok(), Some(httparse::Status::Complete(head.len)));
    assert_eq!(req.method, Some("CONNECT"));
    assert_eq!(req.path, Some(target));
    let _ = aml_egress::policy::Target::parse(target);
});
