//! The HTTP adapter's request body parser (one event, an array, or NDJSON; validation; Avro
//! encoding): any body gives prepared events or an error naming the bad event, never a panic.
#![no_main]

use ctr_ingest::json::{Framing, Preparer, TimeBounds};
use ctr_schemas::IdGenerator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bounds = TimeBounds {
        max_future_ms: 300_000,
        max_age_ms: 86_400_000,
    };
    for framing in [Framing::Json, Framing::Ndjson] {
        let mut p = Preparer::new(IdGenerator::new(3).expect("shard"), Some(bounds), 10_000);
        let _ = p.prepare(data, framing, 1_763_900_000_000);
    }
});
