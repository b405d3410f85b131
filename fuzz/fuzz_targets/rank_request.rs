//! The ranking API's request parser and checks (`POST /v1/rank`): any body gives a request or
//! a 400 naming the field, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ctr_scorer::api::parse_rank(data);
});
