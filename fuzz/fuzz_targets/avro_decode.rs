//! The Avro decoder of every topic's records (Confluent framing + datum) and the value checks
//! after it: any bytes give a record or a typed error, never a panic.
#![no_main]

use ctr_schemas::{Click, LabeledImpression, Serve, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = decode::<Serve>(data) {
        let _ = s.validate();
        let _ = s.context.key();
    }
    if let Ok(c) = decode::<Click>(data) {
        let _ = c.validate();
    }
    if let Ok(l) = decode::<LabeledImpression>(data) {
        let _ = l.validate();
        let _ = l.context.pairs();
    }
});
