//! Feeds arbitrary bytes to `read_frame`. Whatever decodes must re-encode to
//! exactly the bytes it was read from, and decode again to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let Ok(msg) = airlock_protocol::read_frame(&mut rest) else {
        return;
    };
    let used = data.len() - rest.len();
    let frame = airlock_protocol::encode(&msg).expect("a decoded message re-encodes");
    assert_eq!(frame.as_slice(), &data[..used], "encoding is not canonical");
    let again = airlock_protocol::read_frame(frame.as_slice()).expect("re-encoded frame decodes");
    assert_eq!(again, msg);
});
