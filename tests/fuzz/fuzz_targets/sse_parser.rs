//! Bytes from a gateway's SSE stream, cut into chunks anywhere: `SseParser::push` must
//! never panic. The first byte picks the chunk size, so the fuzzer explores the splits.
//! The error value is ignored: only panics (and unbounded growth) are findings.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat::upstream::sse::SseParser;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut parser = SseParser::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        let _ = parser.push(piece, &mut frames);
        frames.clear();
    }
});
