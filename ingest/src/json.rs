//! The JSON form of serves and clicks, for producers that do not speak Avro on Kafka.
//!
//! One event is an object with a `type`:
//!
//! ```json
//! {"type": "serve", "serve_id": "7311...", "ts_ms": 1760000000000,
//!  "context": {"query_category": "travel", "geo": "US", "device": "mobile", "hour": "13"},
//!  "ads": [{"ad_id": "ad-1", "campaign_id": "c-1", "position": 1, "bid": 0.8}]}
//! {"type": "click", "click_id": "7311...", "serve_id": "7311...", "ad_id": "ad-1", "ts_ms": 1760000002000}
//! ```
//!
//! - IDs are positive 64-bit integers, given as JSON numbers or decimal strings (strings survive
//!   JavaScript, whose numbers lose precision beyond 2^53). `serve_id` of a serve and
//!   `click_id` of a click may be omitted: [`Preparer`] then assigns one from the project's ID
//!   generator. A producer that may retry should assign its own, so that a retried event is
//!   recognised downstream as the same event.
//! - `ts_ms` (Unix milliseconds) may be omitted: the receiving clock's time is used.
//! - `context` is flat: `query_category`, `geo` and `device` are required, every other field is
//!   an extra context field (string values).
//! - Unknown fields are errors, so a misspelt optional field is not silently dropped.
//!
//! A body is one event, a JSON array of events, or NDJSON (one event per line). Parsing is
//! all-or-nothing: [`Preparer::prepare`] returns either every event encoded in the wire format or
//! the list of what is wrong, each error naming the event's index and the field's path. The
//! HTTP adapter and `ctr-ingest replay` share this code, so a JSONL file replays exactly what the
//! adapter would have accepted.

use std::collections::BTreeMap;

use ctr_schemas::{AdShown, Click, Context, Encoder, IdGenerator, Serve};
use serde::Deserialize;
use serde_json::Value;

/// Most errors listed in one answer; the count of all of them is always given.
pub const MAX_LISTED_ERRORS: usize = 100;

/// Which record an event is, and so which topic it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A serve: the ads shown on one result page.
    Serve,
    /// A click on one of them.
    Click,
}

/// An event ready for Kafka: its key (the serve ID, decimal), its wire bytes, and its own ID.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Serve or click.
    pub kind: Kind,
    /// The serve ID of a serve, the click ID of a click (assigned if the producer gave none).
    pub id: i64,
    /// Kafka key: the serve ID, so a serve and its clicks share a partition.
    pub key: String,
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Confluent-framed Avro.
    pub payload: Vec<u8>,
}

/// A parsed, validated event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A serve.
    Serve(Serve),
    /// A click.
    Click(Click),
}

impl Event {
    /// Serve or click.
    pub fn kind(&self) -> Kind {
        match self {
            Event::Serve(_) => Kind::Serve,
            Event::Click(_) => Kind::Click,
        }
    }

    /// The event's own ID: a serve's serve ID, a click's click ID.
    pub fn id(&self) -> i64 {
        match self {
            Event::Serve(s) => s.serve_id,
            Event::Click(c) => c.click_id,
        }
    }

    /// The serve the event belongs to: its Kafka key.
    pub fn serve_id(&self) -> i64 {
        match self {
            Event::Serve(s) => s.serve_id,
            Event::Click(c) => c.serve_id,
        }
    }

    /// Event time, Unix ms.
    pub fn ts_ms(&self) -> i64 {
        match self {
            Event::Serve(s) => s.ts_ms,
            Event::Click(c) => c.ts_ms,
        }
    }

    /// Moves the event to another event time.
    pub fn set_ts_ms(&mut self, ts_ms: i64) {
        match self {
            Event::Serve(s) => s.ts_ms = ts_ms,
            Event::Click(c) => c.ts_ms = ts_ms,
        }
    }

    /// Checks the event against the contract; the problem in words.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Event::Serve(s) => s.validate(),
            Event::Click(c) => c.validate(),
        }
        .map_err(|e| e.to_string())
    }
}

impl From<Serve> for Event {
    fn from(s: Serve) -> Self {
        Event::Serve(s)
    }
}

impl From<Click> for Event {
    fn from(c: Click) -> Self {
        Event::Click(c)
    }
}

/// What is wrong with one event of a body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventError {
    /// Position of the event in the body (array index or NDJSON line, from 0).
    pub index: usize,
    /// What is wrong with it.
    pub error: String,
}

/// Why a body was refused. Nothing of a refused body is produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Bytes that are not UTF-8 (offset of the first bad byte).
    #[error("body is not valid UTF-8 (first bad byte at offset {0})")]
    NotUtf8(usize),
    /// Text that is not JSON (the parser's message).
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// No event at all.
    #[error("body holds no events")]
    Empty,
    /// More events than the adapter takes in one body.
    #[error("{got} events in one body; at most {max} are accepted")]
    TooManyEvents {
        /// Events in the body.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// JSON that is neither an event, nor an array of events, nor NDJSON.
    #[error("the body must be an event object, an array of events, or NDJSON")]
    NotAnEvent,
    /// Some events are invalid; `errors` lists the first [`MAX_LISTED_ERRORS`].
    #[error("{total} of {events} events are invalid")]
    Invalid {
        /// Events in the body.
        events: usize,
        /// Invalid events in the body.
        total: usize,
        /// The first invalid events (at most [`MAX_LISTED_ERRORS`]).
        errors: Vec<EventError>,
    },
}

/// How a body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON value: an event object or an array of them.
    Json,
    /// One event object per line; blank lines are skipped.
    Ndjson,
}

/// The accepted range of event times, relative to the receiving clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    /// Most an event time may lie in the future, ms (clock skew of producers).
    pub max_future_ms: i64,
    /// Most an event time may lie in the past, ms (older traffic is replayed, not posted).
    pub max_age_ms: i64,
}

/// Turns JSON events into wire records: parses, assigns missing IDs and times, validates,
/// encodes.
#[derive(Debug)]
pub struct Preparer {
    ids: IdGenerator,
    serves: Encoder<Serve>,
    clicks: Encoder<Click>,
    bounds: Option<TimeBounds>,
    max_events: usize,
}

impl Preparer {
    /// `bounds: None` accepts any positive event time (replay of recorded traffic).
    pub fn new(ids: IdGenerator, bounds: Option<TimeBounds>, max_events: usize) -> Self {
        Self {
            ids,
            serves: Encoder::new(),
            clicks: Encoder::new(),
            bounds,
            max_events,
        }
    }

    /// Prepares every event of `body`, or none. `now_ms` is the receiving clock.
    pub fn prepare(
        &mut self,
        body: &[u8],
        framing: Framing,
        now_ms: i64,
    ) -> Result<Vec<Prepared>, BodyError> {
        let text = std::str::from_utf8(body).map_err(|e| BodyError::NotUtf8(e.valid_up_to()))?;
        let values = split(text, framing, self.max_events)?;
        let events = values.len();
        let mut out = Vec::with_capacity(events);
        let mut errors = Vec::new();
        let mut total = 0;
        for (index, value) in values.into_iter().enumerate() {
            match self.prepare_one(value, now_ms) {
                Ok(p) => out.push(p),
                Err(error) => {
                    total += 1;
                    if errors.len() < MAX_LISTED_ERRORS {
                        errors.push(EventError { index, error });
                    }
                }
            }
        }
        if total > 0 {
            return Err(BodyError::Invalid {
                events,
                total,
                errors,
            });
        }
        Ok(out)
    }

    /// Parses one event given as a JSON value (a line of a JSONL file, say): IDs and time
    /// assigned if absent, values validated.
    pub fn parse_value(&mut self, value: Value, now_ms: i64) -> Result<Event, String> {
        let Value::Object(mut map) = value else {
            return Err("an event must be a JSON object".into());
        };
        let kind = match map.remove("type") {
            Some(Value::String(t)) if t == "serve" => Kind::Serve,
            Some(Value::String(t)) if t == "click" => Kind::Click,
            Some(other) => {
                return Err(format!("type: must be \"serve\" or \"click\", got {other}"));
            }
            None => return Err("type: missing (\"serve\" or \"click\")".into()),
        };
        let value = Value::Object(map);
        let event = match kind {
            Kind::Serve => {
                let s: ServeJson = typed(value)?;
                let ts_ms = self.check_ts(s.ts_ms, now_ms)?;
                let serve_id = match s.serve_id {
                    Some(JsonId(id)) => id,
                    None => self.ids.next_at(now_ms.max(0) as u64),
                };
                Event::Serve(Serve {
                    serve_id,
                    ts_ms,
                    context: Context::from_fields(s.context)
                        .map_err(|e| format!("{}: {}", e.field, e.problem))?,
                    ads: s.ads.into_iter().map(AdJson::into_ad).collect(),
                })
            }
            Kind::Click => {
                let c: ClickJson = typed(value)?;
                let ts_ms = self.check_ts(c.ts_ms, now_ms)?;
                let click_id = match c.click_id {
                    Some(JsonId(id)) => id,
                    None => self.ids.next_at(now_ms.max(0) as u64),
                };
                Event::Click(Click {
                    click_id,
                    serve_id: c.serve_id.0,
                    ad_id: c.ad_id,
                    ts_ms,
                })
            }
        };
        event.validate()?;
        Ok(event)
    }

    /// Encodes an event in the wire format.
    pub fn encode(&mut self, event: &Event) -> Result<Prepared, String> {
        let mut payload = Vec::with_capacity(128);
        match event {
            Event::Serve(s) => self.serves.encode_into(s, &mut payload),
            Event::Click(c) => self.clicks.encode_into(c, &mut payload),
        }
        .map_err(|e| e.to_string())?;
        Ok(Prepared {
            kind: event.kind(),
            id: event.id(),
            key: event.serve_id().to_string(),
            ts_ms: event.ts_ms(),
            payload,
        })
    }

    fn prepare_one(&mut self, value: Value, now_ms: i64) -> Result<Prepared, String> {
        let event = self.parse_value(value, now_ms)?;
        self.encode(&event)
    }

    fn check_ts(&self, ts_ms: Option<i64>, now_ms: i64) -> Result<i64, String> {
        let Some(ts) = ts_ms else { return Ok(now_ms) };
        if ts <= 0 {
            return Err("ts_ms: must be milliseconds since the Unix epoch".into());
        }
        if let Some(b) = self.bounds {
            if ts - now_ms > b.max_future_ms {
                return Err(format!(
                    "ts_ms: {} ms in the future; at most {} ms is accepted (check the producer's clock)",
                    ts - now_ms,
                    b.max_future_ms
                ));
            }
            if now_ms - ts > b.max_age_ms {
                return Err(format!(
                    "ts_ms: {} ms in the past; at most {} ms is accepted (replay older traffic with `ctr-ingest replay`)",
                    now_ms - ts,
                    b.max_age_ms
                ));
            }
        }
        Ok(ts)
    }
}

/// Splits a body into event values.
fn split(text: &str, framing: Framing, max_events: usize) -> Result<Vec<Value>, BodyError> {
    let values = match framing {
        Framing::Json => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => items,
            Ok(v @ Value::Object(_)) => vec![v],
            Ok(_) => return Err(BodyError::NotAnEvent),
            Err(e) => return Err(BodyError::NotJson(e.to_string())),
        },
        Framing::Ndjson => {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                if out.len() == max_events {
                    return Err(BodyError::TooManyEvents {
                        got: max_events + 1,
                        max: max_events,
                    });
                }
                let v = serde_json::from_str::<Value>(line)
                    .map_err(|e| BodyError::NotJson(format!("line {}: {e}", i + 1)))?;
                out.push(v);
            }
            out
        }
    };
    if values.is_empty() {
        return Err(BodyError::Empty);
    }
    if values.len() > max_events {
        return Err(BodyError::TooManyEvents {
            got: values.len(),
            max: max_events,
        });
    }
    Ok(values)
}

/// Deserializes with the path of the failing field in the message (`ads[1].bid: ...`).
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeJson {
    serve_id: Option<JsonId>,
    ts_ms: Option<i64>,
    context: BTreeMap<String, String>,
    ads: Vec<AdJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdJson {
    ad_id: String,
    campaign_id: String,
    position: i32,
    bid: f64,
}

impl AdJson {
    fn into_ad(self) -> AdShown {
        AdShown {
            ad_id: self.ad_id,
            campaign_id: self.campaign_id,
            position: self.position,
            bid: self.bid,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClickJson {
    click_id: Option<JsonId>,
    serve_id: JsonId,
    ad_id: String,
    ts_ms: Option<i64>,
}

/// A positive 64-bit ID as a JSON number or a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JsonId(i64);

impl<'de> Deserialize<'de> for JsonId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = JsonId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a positive 64-bit ID, as a number or a decimal string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<JsonId, E> {
                if v > 0 {
                    Ok(JsonId(v))
                } else {
                    Err(E::custom(format!("ID {v} is not positive")))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<JsonId, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom(format!("ID {v} does not fit in 63 bits")))
                    .and_then(|v| self.visit_i64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JsonId, E> {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::custom(format!("ID {v:?} is not a decimal number")));
                }
                let n: i64 = v
                    .parse()
                    .map_err(|_| E::custom(format!("ID {v} does not fit in 63 bits")))?;
                self.visit_i64(n)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_760_000_000_000;
    const SERVE: &str = r#"{"type":"serve","serve_id":"42","ts_ms":1760000000000,
        "context":{"query_category":"travel","geo":"US","device":"mobile","hour":"13"},
        "ads":[{"ad_id":"a1","campaign_id":"c1","position":1,"bid":0.5}]}"#;
    const CLICK: &str =
        r#"{"type":"click","click_id":43,"serve_id":42,"ad_id":"a1","ts_ms":1760000001000}"#;

    fn preparer() -> Preparer {
        Preparer::new(
            IdGenerator::new(7).unwrap(),
            Some(TimeBounds {
                max_future_ms: 300_000,
                max_age_ms: 86_400_000,
            }),
            1_000,
        )
    }

    fn one_error(body: &str) -> String {
        match preparer().prepare(body.as_bytes(), Framing::Json, NOW) {
            Err(BodyError::Invalid { errors, .. }) => errors[0].error.clone(),
            other => panic!("expected an invalid event, got {other:?}"),
        }
    }

    #[test]
    fn events_encode_to_the_wire_format_and_decode_back() {
        let body = format!("[{SERVE},{CLICK}]");
        let out = preparer()
            .prepare(body.as_bytes(), Framing::Json, NOW)
            .unwrap();
        assert_eq!(out.len(), 2);
        let serve: Serve = ctr_schemas::decode(&out[0].payload).unwrap();
        assert_eq!((serve.serve_id, out[0].key.as_str()), (42, "42"));
        assert_eq!(serve.context.extra["hour"], "13");
        assert_eq!(serve.ads[0].bid, 0.5);
        let click: Click = ctr_schemas::decode(&out[1].payload).unwrap();
        assert_eq!((click.click_id, click.serve_id), (43, 42));
        assert_eq!(
            (out[1].kind, out[1].id, out[1].key.as_str()),
            (Kind::Click, 43, "42")
        );
    }

    #[test]
    fn ndjson_and_single_objects_are_accepted() {
        let body = format!("{}\n\n{CLICK}\n", SERVE.replace('\n', " "));
        let out = preparer()
            .prepare(body.as_bytes(), Framing::Ndjson, NOW)
            .unwrap();
        assert_eq!(out.len(), 2);
        let out = preparer()
            .prepare(CLICK.as_bytes(), Framing::Json, NOW)
            .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn missing_ids_and_times_are_assigned() {
        let body = r#"{"type":"serve","context":{"query_category":"t","geo":"g","device":"d"},
            "ads":[{"ad_id":"a","campaign_id":"c","position":1,"bid":1}]}"#;
        let mut p = preparer();
        let a = p.prepare(body.as_bytes(), Framing::Json, NOW).unwrap();
        let b = p.prepare(body.as_bytes(), Framing::Json, NOW).unwrap();
        assert_ne!(a[0].id, b[0].id, "each event gets its own ID");
        let parts = ctr_schemas::IdParts::of(a[0].id).unwrap();
        assert_eq!((parts.shard, parts.unix_ms), (7, NOW as u64));
        assert_eq!(a[0].ts_ms, NOW);
    }

    #[test]
    fn errors_name_the_event_and_the_field() {
        assert_eq!(
            one_error(&SERVE.replace("\"bid\":0.5", "\"bid\":\"x\"")),
            "ads[0].bid: invalid type: string \"x\", expected f64"
        );
        assert!(one_error(&SERVE.replace("\"bid\":0.5", "\"bid\":-1")).contains("ads.bid"));
        assert_eq!(
            one_error(&CLICK.replace("\"ad_id\"", "\"ad\"")),
            "ad: unknown field `ad`, expected one of `click_id`, `serve_id`, `ad_id`, `ts_ms`"
        );
        assert_eq!(
            one_error(&CLICK.replace(",\"ad_id\":\"a1\"", "")),
            "missing field `ad_id`"
        );
        assert_eq!(
            one_error(&SERVE.replace("\"geo\":\"US\",", "")),
            "context.geo: missing"
        );
        assert!(one_error(&CLICK.replace("\"type\":\"click\",", "")).starts_with("type: missing"));
        assert!(one_error(&CLICK.replace("\"click\"", "\"view\"")).starts_with("type: must be"));
        assert!(one_error(&CLICK.replace("43", "-5")).contains("not positive"));
        assert!(one_error(&CLICK.replace("43", "\"4x3\"")).contains("not a decimal number"));
        assert!(one_error(&CLICK.replace("43", "18446744073709551615")).contains("63 bits"));
        assert!(one_error(&CLICK.replace("\"a1\"", "\"a|1\"")).contains("ad_id"));
    }

    #[test]
    fn event_times_out_of_bounds_are_refused() {
        let future = CLICK.replace("1760000001000", "1760000400000");
        assert!(
            one_error(&future).contains("in the future"),
            "{}",
            one_error(&future)
        );
        let past = CLICK.replace("1760000001000", "1750000000000");
        assert!(one_error(&past).contains("in the past"));
        // Replay takes any positive time.
        let mut replay = Preparer::new(IdGenerator::new(1).unwrap(), None, 10);
        assert!(replay.prepare(past.as_bytes(), Framing::Json, NOW).is_ok());
    }

    #[test]
    fn a_body_is_refused_whole_with_every_error_counted() {
        let bad = CLICK.replace("\"a1\"", "\"\"");
        let body = format!("[{CLICK},{bad},{SERVE},{bad}]");
        match preparer().prepare(body.as_bytes(), Framing::Json, NOW) {
            Err(BodyError::Invalid {
                events,
                total,
                errors,
            }) => {
                assert_eq!((events, total), (4, 2));
                assert_eq!(errors.iter().map(|e| e.index).collect::<Vec<_>>(), [1, 3]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let mut p = preparer();
        let mut check = |body: &[u8], framing| p.prepare(body, framing, NOW).unwrap_err();
        assert_eq!(
            check(b"{\"type\":\"cl\xffck\"}", Framing::Json),
            BodyError::NotUtf8(11)
        );
        assert!(matches!(
            check(b"{\"type\":", Framing::Json),
            BodyError::NotJson(_)
        ));
        assert!(matches!(
            check(b"[1,", Framing::Json),
            BodyError::NotJson(_)
        ));
        assert_eq!(check(b"42", Framing::Json), BodyError::NotAnEvent);
        assert_eq!(check(b"[]", Framing::Json), BodyError::Empty);
        assert_eq!(check(b"\n\n", Framing::Ndjson), BodyError::Empty);
        let e = check(b"{}\n{\"x\":", Framing::Ndjson);
        assert!(
            matches!(&e, BodyError::NotJson(m) if m.starts_with("line 2")),
            "{e:?}"
        );
        let many = format!("[{}]", vec![CLICK; 1_001].join(","));
        assert_eq!(
            check(many.as_bytes(), Framing::Json),
            BodyError::TooManyEvents {
                got: 1_001,
                max: 1_000
            }
        );
        let arr = check(b"[1]", Framing::Json);
        assert!(matches!(arr, BodyError::Invalid { .. }), "{arr:?}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut p = preparer();
            let _ = p.prepare(&body, Framing::Json, NOW);
            let _ = p.prepare(&body, Framing::Ndjson, NOW);
        }
    }
}
