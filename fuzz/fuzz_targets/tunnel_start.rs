//! What a tunnel carries, told from its first bytes (protocol detection), and the reader of
//! the server's first flight: neither panics, and detection answers the same however the
//! bytes are split.
#![no_main]

use aml_egress::proxy::connect::detect::{Carried, Detector};
use aml_egress::proxy::connect::sni::{ServerReader, change_cipher_spec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 16) + 1;
    let whole = Detector::default().read(stream, 8192);
    let mut d = Detector::default();
    let mut split = Carried::Incomplete;
    let mut n = 0;
    while n < stream.len() && split == Carried::Incomplete {
        n = (n + step).min(stream.len());
        split = d.read(&stream[..n], 8192);
    }
    assert_eq!(split, whole);

    let mut server = ServerReader::default();
    for chunk in stream.chunks(step) {
        server.feed(chunk);
        let _ = server.message(0);
        let _ = server.message(1);
    }
    let _ = change_cipher_spec(stream, usize::from(step));
});
