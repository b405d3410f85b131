//! Confluent wire framing and the in-code schema registry.
//!
//! Every Kafka value is `0x00` (magic) + the writer schema's ID as a 4-byte big-endian integer +
//! the Avro binary datum, the framing Confluent's serializers use, so standard Kafka tooling and
//! other-language producers can read and write our topics. There is no registry server: the IDs
//! are fixed here, one per schema *version*, and never reused.
//!
//! | id | record              | file                      |
//! |----|---------------------|---------------------------|
//! | 1  | `ctr.events.Serve`  | `avro/serve.v1.avsc`      |
//! | 2  | `ctr.events.Click`  | `avro/click.v1.avsc`      |
//! | 3  | `ctr.events.LabeledImpression` | `avro/labeled.v1.avsc` |
//! | 4  | `ctr.events.Serve`  | `avro/serve.v2.avsc` (adds `context.extra`) |
//! | 5  | `ctr.events.LabeledImpression` | `avro/labeled.v2.avsc` (adds `kind`) |
//!
//! Encoders always write the newest version of a record. Decoders accept every registered
//! version of the record they expect and decode with the *writer's* schema; fields a version
//! lacks take their serde default, which is how Avro's reader/writer resolution treats a field
//! added with a default. The hot path uses `serde_avro_fast` (see docs/BENCHMARKS.md for the
//! measured difference against `apache-avro`).

use std::sync::LazyLock;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_avro_fast::Schema;
use serde_avro_fast::de::read::SliceRead;
use serde_avro_fast::de::{DeserializerConfig, DeserializerState};
use serde_avro_fast::ser::SerializerConfig;

use crate::events::{Click, LabeledImpression, Serve, ValidationError};

/// Which record a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A page with its ads.
    Serve,
    /// A click.
    Click,
    /// A labeled impression.
    Labeled,
}

/// One registered schema version.
#[derive(Debug)]
pub struct RegisteredSchema {
    /// The schema ID on the wire.
    pub id: u32,
    /// The record it describes.
    pub kind: EventKind,
    /// The `.avsc` text, embedded at compile time.
    pub avsc: &'static str,
}

/// Every schema version the pipeline has ever written, in ID order.
pub const REGISTRY: &[RegisteredSchema] = &[
    RegisteredSchema {
        id: 1,
        kind: EventKind::Serve,
        avsc: include_str!("../avro/serve.v1.avsc"),
    },
    RegisteredSchema {
        id: 2,
        kind: EventKind::Click,
        avsc: include_str!("../avro/click.v1.avsc"),
    },
    RegisteredSchema {
        id: 3,
        kind: EventKind::Labeled,
        avsc: include_str!("../avro/labeled.v1.avsc"),
    },
    RegisteredSchema {
        id: 4,
        kind: EventKind::Serve,
        avsc: include_str!("../avro/serve.v2.avsc"),
    },
    RegisteredSchema {
        id: 5,
        kind: EventKind::Labeled,
        avsc: include_str!("../avro/labeled.v2.avsc"),
    },
];

/// Parsed schemas, index-aligned with [`REGISTRY`]. The files are part of the binary, so a
/// parse failure is a build defect caught by this crate's tests, never a runtime condition.
static PARSED: LazyLock<Vec<Schema>> = LazyLock::new(|| {
    REGISTRY
        .iter()
        .map(|r| {
            r.avsc
                .parse()
                .unwrap_or_else(|e| panic!("schema id {} does not parse: {e}", r.id))
        })
        .collect()
});

/// Looks up a registered schema by ID.
pub fn schema_by_id(id: u32) -> Option<(&'static RegisteredSchema, &'static Schema)> {
    let idx = REGISTRY.iter().position(|r| r.id == id)?;
    Some((&REGISTRY[idx], &PARSED[idx]))
}

/// A record type that travels on Kafka.
pub trait WireEvent: Serialize + DeserializeOwned {
    /// The record type.
    const KIND: EventKind;
    /// The schema ID new records of this type are written with.
    const WRITE_ID: u32;
}

impl WireEvent for Serve {
    const KIND: EventKind = EventKind::Serve;
    const WRITE_ID: u32 = 4;
}
impl WireEvent for Click {
    const KIND: EventKind = EventKind::Click;
    const WRITE_ID: u32 = 2;
}
impl WireEvent for LabeledImpression {
    const KIND: EventKind = EventKind::Labeled;
    const WRITE_ID: u32 = 5;
}

const MAGIC: u8 = 0;
const HEADER_LEN: usize = 5;
const MAX_SEQUENCE_ITEMS: usize = 100_000;

/// Why bytes could not become an event. Every variant is a poison message: retrying the same
/// bytes can never succeed, so consumers dead-letter them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {0} bytes, shorter than the 5-byte wire header")]
    /// Fewer bytes than the wire header.
    TooShort(usize),
    #[error("magic byte is {0:#04x}, expected 0x00 (Confluent wire format)")]
    /// Not the Confluent wire format.
    BadMagic(u8),
    #[error("unknown schema id {0}")]
    /// A schema ID the registry does not know.
    UnknownSchemaId(u32),
    #[error("schema id {id} is a {found:?} record, expected {expected:?}")]
    /// A known schema, of another record type.
    WrongRecord {
        /// The schema ID.
        id: u32,
        /// The record type asked for.
        expected: EventKind,
        /// The record type of that schema.
        found: EventKind,
    },
    #[error("Avro datum does not match schema id {id}: {reason}")]
    /// The bytes after the header are not a datum of that schema.
    Datum {
        /// The schema ID.
        id: u32,
        /// What did not match.
        reason: String,
    },
}

/// Why an event could not be encoded (a value the schema cannot hold).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {kind:?} with schema id {id}: {reason}")]
pub struct EncodeError {
    /// The record type.
    pub kind: EventKind,
    /// The schema ID it was written with.
    pub id: u32,
    /// What the schema could not hold.
    pub reason: String,
}

/// Decodes one framed Kafka value into `E`, accepting any registered version of `E`'s record.
pub fn decode<E: WireEvent>(bytes: &[u8]) -> Result<E, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    if bytes[0] != MAGIC {
        return Err(DecodeError::BadMagic(bytes[0]));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let (reg, schema) = schema_by_id(id).ok_or(DecodeError::UnknownSchemaId(id))?;
    if reg.kind != E::KIND {
        return Err(DecodeError::WrongRecord {
            id,
            expected: E::KIND,
            found: reg.kind,
        });
    }
    let body = &bytes[HEADER_LEN..];
    let mut config = DeserializerConfig::new(schema);
    // No record of ours holds more than a few hundred array or map items; a garbage length
    // prefix must fail fast instead of spinning through a billion empty items.
    config.max_seq_size = MAX_SEQUENCE_ITEMS;
    let mut state = DeserializerState::with_config(SliceRead::new(body), config);
    E::deserialize(state.deserializer()).map_err(|e| DecodeError::Datum {
        id,
        reason: e.to_string(),
    })
}

impl Encoder<LabeledImpression> {
    /// Appends the framed encoding of a borrowed label; the bytes equal those of the owned one.
    pub fn encode_ref_into(
        &mut self,
        label: &crate::events::LabeledImpressionRef<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.encode_serializable(label, out)
    }
}

/// Encodes events of one type, reusing the serializer's schema lookups across calls.
pub struct Encoder<E: WireEvent> {
    config: SerializerConfig<'static>,
    _kind: std::marker::PhantomData<fn(&E)>,
}

impl<E: WireEvent> std::fmt::Debug for Encoder<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("schema_id", &E::WRITE_ID)
            .finish()
    }
}

impl<E: WireEvent> Default for Encoder<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: WireEvent> Encoder<E> {
    /// An encoder writing `E`'s current schema version.
    pub fn new() -> Self {
        let (_, schema) = schema_by_id(E::WRITE_ID).expect("WRITE_ID is registered");
        Self {
            config: SerializerConfig::new(schema),
            _kind: std::marker::PhantomData,
        }
    }

    /// Appends the framed encoding of `event` to `out`.
    pub fn encode_into(&mut self, event: &E, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_serializable(event, out)
    }

    fn encode_serializable<T: Serialize + ?Sized>(
        &mut self,
        event: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        out.push(MAGIC);
        out.extend_from_slice(&E::WRITE_ID.to_be_bytes());
        let taken = std::mem::take(out);
        match serde_avro_fast::to_datum(event, taken, &mut self.config) {
            Ok(buf) => {
                *out = buf;
                Ok(())
            }
            Err(e) => Err(EncodeError {
                kind: E::KIND,
                id: E::WRITE_ID,
                reason: e.to_string(),
            }),
        }
    }

    /// Returns the framed encoding of `event` in a new buffer.
    pub fn encode(&mut self, event: &E) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(128);
        self.encode_into(event, &mut out)?;
        Ok(out)
    }
}

/// Value checks of a decoded event (the inherent `validate` of each event type).
pub trait Validate {
    /// `Ok` when every field holds a value the pipeline accepts.
    fn validate(&self) -> Result<(), ValidationError>;
}

impl Validate for Serve {
    fn validate(&self) -> Result<(), ValidationError> {
        Serve::validate(self)
    }
}

impl Validate for Click {
    fn validate(&self) -> Result<(), ValidationError> {
        Click::validate(self)
    }
}

impl Validate for LabeledImpression {
    fn validate(&self) -> Result<(), ValidationError> {
        LabeledImpression::validate(self)
    }
}

/// Why a consumed record cannot be used: every service dead-letters it with this reason and
/// counts it under [`Unusable::label`].
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// The record has no payload.
    #[error("message has no payload")]
    Empty,
    /// The payload is not a record of the expected schema.
    #[error("undecodable: {0}")]
    Decode(#[from] DecodeError),
    /// It decodes, but a value is out of the contract's bounds.
    #[error("invalid: {0}")]
    Invalid(#[from] ValidationError),
}

impl Unusable {
    /// The metric label of the reason (`undecodable`, `invalid`).
    pub fn label(&self) -> &'static str {
        match self {
            Unusable::Empty | Unusable::Decode(_) => "undecodable",
            Unusable::Invalid(_) => "invalid",
        }
    }
}

/// Decodes and validates a consumed record's payload.
pub fn decode_valid<E: WireEvent + Validate>(payload: Option<&[u8]>) -> Result<E, Unusable> {
    let event: E = decode(payload.ok_or(Unusable::Empty)?)?;
    event.validate()?;
    Ok(event)
}
