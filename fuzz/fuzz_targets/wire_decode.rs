//! `Frame::decode` of arbitrary bytes: never panics, and whatever decodes re-encodes to
//! bytes that decode to the same frame.
#![no_main]

use cofab_protocol::wire::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let again = Frame::encode(&frame);
        assert_eq!(Frame::decode(&again).as_ref(), Ok(&frame), "decode(encode(f)) != f");
    }
});
