//! cargo-fuzz entry of the `guest_agent` target; the body is `faultline_fuzz::guest_agent::guest_agent`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| faultline_fuzz::guest_agent::guest_agent(data));
