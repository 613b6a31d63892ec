//! The incremental ClientHello reader on the first bytes of a tunnel, fed in the pieces the
//! input chooses: never panics, answers the same however the bytes are split, examines each
//! byte at most once, and a name it returns is a valid host name.
#![no_main]

use aml_egress::policy::Target;
use aml_egress::proxy::connect::sni::{HelloReader, server_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the rest is split into reads.
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let whole = server_name(stream);
    if let Ok(Some(name)) = whole {
        assert!(Target::parse(&format!("{}:443", name.as_str())).is_ok());
    }
    let step = usize::from(step % 16) + 1;
    let mut reader = HelloReader::default();
    let mut outcome = Ok(None);
    let mut n = 0;
    while n < stream.len() {
        n = (n + step).min(stream.len());
        outcome = reader.read(&stream[..n]);
        if !matches!(outcome, Ok(None)) {
            break;
        }
    }
    assert!(reader.examined() <= stream.len());
    match (outcome, whole) {
        (Ok(Some(h)), Ok(name)) => assert_eq!(h.server_name, name),
        (Ok(None), Err(_)) | (Err(_), Err(_)) => {}
        (a, b) => panic!("split reads gave {a:?}, one read gave {b:?}"),
    }
});
