//! Decode cost on the hot path: our decoder (serde_avro_fast) against the reference
//! apache-avro datum decode, on the same bytes in the same run; and ID generation rate.
//!
//! Run: `cargo bench -p ctr-schemas --bench codec`

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ctr_schemas::wire::schema_by_id;
use ctr_schemas::{
    AdShown, Context, Encoder, IdGenerator, LabelKind, LabeledImpression, Serve, WireEvent, decode,
};

fn context() -> Context {
    Context {
        query_category: "electronics".into(),
        geo: "US".into(),
        device: "mobile".into(),
        extra: BTreeMap::from([("hour".to_string(), "14".to_string())]),
    }
}

fn serve() -> Serve {
    Serve {
        serve_id: 1_234_567_890_123,
        ts_ms: 1_760_000_000_000,
        context: context(),
        ads: (1..=4)
            .map(|p| AdShown {
                ad_id: format!("ad-{p:06}"),
                campaign_id: format!("camp-{p:04}"),
                position: p,
                bid: 0.25 * f64::from(p),
            })
            .collect(),
    }
}

fn labeled() -> LabeledImpression {
    LabeledImpression {
        label_id: LabeledImpression::label_id_for(1_234_567_890_123, "ad-000001"),
        serve_id: 1_234_567_890_123,
        ad_id: "ad-000001".into(),
        campaign_id: "camp-0001".into(),
        position: 1,
        context: context(),
        clicked: false,
        ts_ms: 1_760_000_000_000,
        click_ts_ms: None,
        kind: LabelKind::Label,
    }
}

fn compare<E: WireEvent + std::fmt::Debug>(c: &mut Criterion, name: &str, event: &E) {
    let bytes = Encoder::<E>::new().encode(event).unwrap();
    let schema = apache_avro::Schema::parse_str(schema_by_id(E::WRITE_ID).unwrap().0.avsc).unwrap();
    let mut g = c.benchmark_group(format!("decode_{name}"));
    g.throughput(Throughput::Elements(1));
    g.bench_function("serde_avro_fast", |b| {
        b.iter(|| decode::<E>(black_box(&bytes)).unwrap())
    });
    g.bench_function("apache_avro", |b| {
        b.iter(|| {
            let v =
                apache_avro::from_avro_datum(&schema, &mut black_box(&bytes[5..]), None).unwrap();
            apache_avro::from_value::<E>(&v).unwrap()
        })
    });
    g.finish();
    let mut g = c.benchmark_group(format!("encode_{name}"));
    let mut enc = Encoder::<E>::new();
    let mut buf = Vec::with_capacity(256);
    g.bench_function("serde_avro_fast", |b| {
        b.iter(|| {
            buf.clear();
            enc.encode_into(black_box(event), &mut buf).unwrap();
        })
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    compare(c, "serve", &serve());
    compare(c, "labeled", &labeled());
}

fn ids(c: &mut Criterion) {
    let mut g = c.benchmark_group("id_generator");
    g.throughput(Throughput::Elements(1));
    let mut gen_ = IdGenerator::new(7).unwrap();
    g.bench_function("next_id_system_clock", |b| {
        b.iter(|| black_box(gen_.next_id()))
    });
    g.finish();
}

criterion_group!(benches, codec, ids);
criterion_main!(benches);
