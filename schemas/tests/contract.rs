//! The event contract, checked against the reference Avro implementation (`apache-avro`):
//! round trips, schema evolution, cross-implementation decoding, and hostile bytes.

use std::collections::BTreeMap;

use apache_avro::Schema as RefSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use ctr_schemas::wire::{REGISTRY, schema_by_id};
use ctr_schemas::{
    AdShown, Click, Context, DecodeError, Encoder, EventKind, LabelKind, LabeledImpression, Serve,
    WireEvent, decode,
};
use proptest::prelude::*;

fn serve() -> Serve {
    Serve {
        serve_id: 123_456_789,
        ts_ms: 1_760_000_000_000,
        context: Context {
            query_category: "travel".into(),
            geo: "DE".into(),
            device: "desktop".into(),
            extra: BTreeMap::from([("hour".to_string(), "9".to_string())]),
        },
        ads: vec![
            AdShown {
                ad_id: "ad-1".into(),
                campaign_id: "c-1".into(),
                position: 1,
                bid: 0.75,
            },
            AdShown {
                ad_id: "ad-2".into(),
                campaign_id: "c-1".into(),
                position: 2,
                bid: 1.5,
            },
        ],
    }
}

fn labeled() -> LabeledImpression {
    LabeledImpression {
        label_id: LabeledImpression::label_id_for(9, "ad-9"),
        serve_id: 9,
        ad_id: "ad-9".into(),
        campaign_id: "c-3".into(),
        position: 3,
        context: serve().context,
        clicked: true,
        ts_ms: 1_760_000_000_000,
        click_ts_ms: Some(1_760_000_004_000),
        kind: LabelKind::Label,
    }
}

fn reference_schema(id: u32) -> RefSchema {
    RefSchema::parse_str(schema_by_id(id).unwrap().0.avsc).unwrap()
}

fn frame(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

#[test]
fn every_registered_schema_parses_in_both_implementations() {
    for r in REGISTRY {
        assert!(schema_by_id(r.id).is_some());
        RefSchema::parse_str(r.avsc).unwrap_or_else(|e| panic!("id {}: {e}", r.id));
    }
    let ids: Vec<u32> = REGISTRY.iter().map(|r| r.id).collect();
    let mut dedup = ids.clone();
    dedup.dedup();
    assert_eq!(ids, dedup, "schema IDs are unique");
}

#[test]
fn round_trip_all_records() {
    let s = serve();
    assert_eq!(
        decode::<Serve>(&Encoder::new().encode(&s).unwrap()).unwrap(),
        s
    );
    let c = Click {
        click_id: 5,
        serve_id: 9,
        ad_id: "ad-9".into(),
        ts_ms: 1_760_000_000_100,
    };
    assert_eq!(
        decode::<Click>(&Encoder::new().encode(&c).unwrap()).unwrap(),
        c
    );
    let mut l = labeled();
    assert_eq!(
        decode::<LabeledImpression>(&Encoder::new().encode(&l).unwrap()).unwrap(),
        l
    );
    l.clicked = false;
    l.click_ts_ms = None;
    assert_eq!(
        decode::<LabeledImpression>(&Encoder::new().encode(&l).unwrap()).unwrap(),
        l
    );
}

#[test]
fn serve_v2_can_read_v1_per_avro_resolution_rules() {
    SchemaCompatibility::can_read(&reference_schema(1), &reference_schema(4)).unwrap();
}

#[test]
fn data_written_with_serve_v1_still_decodes() {
    // A producer that still writes v1 (no `context.extra`), encoded by the reference library.
    let v1 = reference_schema(1);
    let mut old = serve();
    old.context.extra.clear();
    let mut value = apache_avro::to_value(&old).unwrap();
    // The v1 record has no `extra` field: drop it from the value before writing with v1.
    if let apache_avro::types::Value::Record(fields) = &mut value
        && let Some((_, apache_avro::types::Value::Record(ctx))) =
            fields.iter_mut().find(|(n, _)| n == "context")
    {
        ctx.retain(|(n, _)| n != "extra");
    }
    let datum = apache_avro::to_avro_datum(&v1, value).unwrap();
    let decoded: Serve = decode(&frame(1, &datum)).unwrap();
    assert_eq!(decoded, old);
    assert!(decoded.context.extra.is_empty());
}

#[test]
fn reference_implementation_reads_what_we_write() {
    let s = serve();
    let bytes = Encoder::new().encode(&s).unwrap();
    assert_eq!(&bytes[..5], &[0, 0, 0, 0, Serve::WRITE_ID as u8]);
    let schema = reference_schema(Serve::WRITE_ID);
    let value = apache_avro::from_avro_datum(&schema, &mut &bytes[5..], None).unwrap();
    let back: Serve = apache_avro::from_value(&value).unwrap();
    assert_eq!(back, s);
}

#[test]
fn labeled_v1_still_decodes_as_a_plain_label() {
    // A v1 labeled impression (no `kind`), written by the reference library with schema id 3.
    let v1 = reference_schema(3);
    let l = labeled();
    let mut value = apache_avro::to_value(&l).unwrap();
    if let apache_avro::types::Value::Record(fields) = &mut value {
        fields.retain(|(n, _)| n != "kind");
    }
    let datum = apache_avro::to_avro_datum(&v1, value).unwrap();
    let decoded: LabeledImpression = decode(&frame(3, &datum)).unwrap();
    assert_eq!(decoded, l);
    assert_eq!(decoded.kind, LabelKind::Label);
    SchemaCompatibility::can_read(&reference_schema(3), &reference_schema(5)).unwrap();
}

#[test]
fn late_click_kind_round_trips() {
    let mut l = labeled();
    l.kind = LabelKind::LateClick;
    l.label_id = LabeledImpression::late_click_id_for(l.serve_id, &l.ad_id);
    l.validate().unwrap();
    assert_eq!(
        decode::<LabeledImpression>(&Encoder::new().encode(&l).unwrap()).unwrap(),
        l
    );
}

#[test]
fn typed_errors_for_bad_frames() {
    let good = Encoder::new().encode(&serve()).unwrap();
    assert_eq!(decode::<Serve>(&[]), Err(DecodeError::TooShort(0)));
    assert_eq!(decode::<Serve>(&[0, 0, 0]), Err(DecodeError::TooShort(3)));
    let mut bad_magic = good.clone();
    bad_magic[0] = 0x7b; // '{': someone sent JSON
    assert_eq!(
        decode::<Serve>(&bad_magic),
        Err(DecodeError::BadMagic(0x7b))
    );
    assert_eq!(
        decode::<Serve>(&frame(99, &good[5..])),
        Err(DecodeError::UnknownSchemaId(99))
    );
    assert_eq!(
        decode::<Click>(&good),
        Err(DecodeError::WrongRecord {
            id: 4,
            expected: EventKind::Click,
            found: EventKind::Serve
        })
    );
    for cut in 5..good.len() {
        assert!(
            matches!(
                decode::<Serve>(&good[..cut]),
                Err(DecodeError::Datum { id: 4, .. })
            ),
            "truncated at {cut} must be a datum error"
        );
    }
}

#[test]
fn huge_length_prefix_fails_fast() {
    // serve_id, ts_ms, context strings, then an ads array claiming i64::MAX/2 items.
    let mut datum = vec![2, 2, 2, b'a', 2, b'b', 2, b'c', 0];
    datum.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(
        decode::<Serve>(&frame(4, &datum)),
        Err(DecodeError::Datum { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), id in 0u32..6) {
        let framed = frame(id, &bytes);
        let _ = decode::<Serve>(&framed);
        let _ = decode::<Click>(&framed);
        let _ = decode::<LabeledImpression>(&framed);
        let _ = decode::<Serve>(&bytes);
    }

    #[test]
    fn flipped_bytes_never_panic(pos in 5usize..60, byte in any::<u8>()) {
        let mut bytes = Encoder::new().encode(&serve()).unwrap();
        let pos = pos % bytes.len();
        bytes[pos] = byte;
        if let Ok(s) = decode::<Serve>(&bytes) {
            // It may decode into a different but well-formed serve; validation then judges it.
            let _ = s.validate();
        }
    }
}

#[test]
fn every_write_id_is_registered_with_its_kind() {
    // Guards against a WRITE_ID bump without its registry entry (found in issue #4's work: the
    // encoder panicked at start-up in every service).
    fn check<E: WireEvent>() {
        let (reg, _) = schema_by_id(E::WRITE_ID).expect("WRITE_ID registered");
        assert_eq!(reg.kind, E::KIND);
    }
    check::<Serve>();
    check::<Click>();
    check::<LabeledImpression>();
}

#[test]
fn a_borrowed_label_encodes_to_the_same_bytes() {
    let l = labeled();
    let r = ctr_schemas::LabeledImpressionRef {
        label_id: &l.label_id,
        serve_id: l.serve_id,
        ad_id: &l.ad_id,
        campaign_id: &l.campaign_id,
        position: l.position,
        context: &l.context,
        clicked: l.clicked,
        ts_ms: l.ts_ms,
        click_ts_ms: l.click_ts_ms,
        kind: l.kind,
    };
    let mut enc = Encoder::<LabeledImpression>::new();
    let mut a = Vec::new();
    enc.encode_ref_into(&r, &mut a).unwrap();
    assert_eq!(a, enc.encode(&l).unwrap());
    assert_eq!(r.to_owned(), l);
}
