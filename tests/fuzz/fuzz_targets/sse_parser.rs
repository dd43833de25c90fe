//! Bytes from a gateway's SSE stream, cut into chunks anywhere, under a small event cap:
//! `SseParser::push` must never panic and no frame may pass the cap (see
//! `lifeboat::upstream::sse::fuzz_input`, which `cargo test` also runs on the corpus).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lifeboat::upstream::sse::fuzz_input(data));
