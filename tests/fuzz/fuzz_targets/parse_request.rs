//! Request bodies from clients: `validate::parse` must answer every byte string with a
//! request or a `ValidationError`, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat::{api::validate, backend::Endpoint};

fuzz_target!(|data: &[u8]| {
    let _ = validate::parse(Endpoint::ChatCompletions, data);
    let _ = validate::parse(Endpoint::Completions, data);
});
