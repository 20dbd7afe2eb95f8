//! cargo-fuzz entry of the `proto` target; the body is `faultline_fuzz::proto::proto`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::proto::proto(data));
