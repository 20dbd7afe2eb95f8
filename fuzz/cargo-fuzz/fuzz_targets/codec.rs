//! cargo-fuzz entry of the `codec` target; the body is `faultline_fuzz::codec::codec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::codec::codec(data));
