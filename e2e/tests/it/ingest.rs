//! The HTTP adapter against the real broker (issue #6): every 202 is in Kafka intact; bad input
//! gets a 4xx and writes nothing; a burst beyond capacity gets 503 for the excess and loses
//! nothing accepted; requests without a valid key get 401.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctr_e2e::*;
use ctr_schemas::{Click, Serve};
use serde_json::{Value, json};

const KEY: &str = "test-key-1";

fn ingest_topics(tag: &str) -> (String, String) {
    let base = unique(tag);
    let t = (format!("{base}.serves"), format!("{base}.clicks"));
    create_topics(&[(&t.0, 4), (&t.1, 4)]);
    t
}

/// Fresh topics and an adapter for them, with the test key and `extra` flags.
fn adapter(tag: &str, extra: &[&str]) -> (String, String, u16, Service) {
    let (serves, clicks) = ingest_topics(tag);
    let port = free_port();
    let key = format!("--api-keys=other,{KEY}");
    let mut args = vec![key.as_str()];
    args.extend(extra);
    let svc = start_ingest(&serves, &clicks, port, &args);
    (serves, clicks, port, svc)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A serve with 1-3 ads and maybe a click, as the JSON a frontend would send. Half of the serves
/// carry their own ID (and so do their clicks), half let the adapter assign one.
fn serve_json(rng: &mut Rng, own_id: Option<i64>) -> Value {
    let n = 1 + rng.next_u64() % 3;
    let ads: Vec<Value> = (0..n)
        .map(|i| {
            json!({"ad_id": format!("ad-{}", rng.next_u64() % 50), "campaign_id": "c-1",
                   "position": i + 1, "bid": (rng.next_u64() % 300) as f64 / 100.0})
        })
        .collect();
    // Distinct ad IDs within a serve.
    let mut seen = std::collections::BTreeSet::new();
    let ads: Vec<Value> = ads
        .into_iter()
        .filter(|a| seen.insert(a["ad_id"].as_str().unwrap().to_string()))
        .collect();
    let mut v = json!({"type": "serve", "ts_ms": now_ms() - 1_000,
        "context": {"query_category": "travel", "geo": "US", "device": "mobile",
                    "hour": format!("{}", rng.next_u64() % 24)},
        "ads": ads});
    if let Some(id) = own_id {
        v["serve_id"] = json!(id.to_string());
    }
    v
}

/// What the adapter said about one accepted event.
#[derive(Debug, Clone)]
struct Accepted {
    sent: Value,
    id: i64,
    partition: i32,
    offset: i64,
}

/// Pairs each event sent with the adapter's per-event result (202 answers only).
fn accepted_of(sent: &[Value], body: &str) -> Vec<Accepted> {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let events = v["events"].as_array().expect("events");
    assert_eq!(events.len(), sent.len(), "{body}");
    events
        .iter()
        .zip(sent)
        .enumerate()
        .map(|(i, (e, s))| {
            assert_eq!(e["index"], i, "{body}");
            assert_eq!(e["status"], "accepted", "{body}");
            assert_eq!(e["type"], s["type"], "{body}");
            Accepted {
                sent: s.clone(),
                id: e["id"].as_str().unwrap().parse().unwrap(),
                partition: e["partition"].as_i64().unwrap() as i32,
                offset: e["offset"].as_i64().unwrap(),
            }
        })
        .collect()
}

/// Asserts the topics hold exactly the accepted events, each at the reported position, with
/// the content that was sent.
fn assert_in_kafka_intact(serves: &str, clicks: &str, accepted: &[Accepted]) {
    let index = |topic| -> BTreeMap<(i32, i64), Record> {
        read_topic(topic)
            .into_iter()
            .map(|r| ((r.partition, r.offset), r))
            .collect()
    };
    let (s_recs, c_recs) = (index(serves), index(clicks));
    let n_serves = accepted
        .iter()
        .filter(|a| a.sent["type"] == "serve")
        .count();
    assert_eq!(
        (s_recs.len(), c_recs.len()),
        (n_serves, accepted.len() - n_serves),
        "the topics hold exactly the accepted events"
    );
    let mut serve_partition = BTreeMap::new();
    for a in accepted.iter().filter(|a| a.sent["type"] == "serve") {
        let rec = &s_recs[&(a.partition, a.offset)];
        let s: Serve = ctr_schemas::decode(&rec.payload).expect("decodes");
        assert_eq!(s.serve_id, a.id);
        assert_eq!(rec.key, a.id.to_string().as_bytes());
        if let Some(given) = a.sent.get("serve_id") {
            assert_eq!(given.as_str().unwrap(), a.id.to_string());
        }
        assert_eq!(s.ts_ms, a.sent["ts_ms"].as_i64().unwrap());
        let ctx = &a.sent["context"];
        assert_eq!(s.context.query_category, ctx["query_category"]);
        assert_eq!(s.context.extra["hour"], ctx["hour"]);
        let ads = a.sent["ads"].as_array().unwrap();
        assert_eq!(s.ads.len(), ads.len());
        for (got, want) in s.ads.iter().zip(ads) {
            assert_eq!(got.ad_id, want["ad_id"]);
            assert_eq!(got.position as i64, want["position"].as_i64().unwrap());
            assert_eq!(got.bid, want["bid"].as_f64().unwrap());
        }
        serve_partition.insert(s.serve_id, rec.partition);
    }
    for a in accepted.iter().filter(|a| a.sent["type"] == "click") {
        let rec = &c_recs[&(a.partition, a.offset)];
        let c: Click = ctr_schemas::decode(&rec.payload).expect("decodes");
        assert_eq!(c.click_id, a.id);
        assert_eq!(c.serve_id.to_string(), a.sent["serve_id"].as_str().unwrap());
        assert_eq!(c.ad_id, a.sent["ad_id"]);
        assert_eq!(c.ts_ms, a.sent["ts_ms"].as_i64().unwrap());
        // The partitioner puts a click where its serve is, whoever produced them.
        if let Some(p) = serve_partition.get(&c.serve_id) {
            assert_eq!(*p, rec.partition, "click and serve in one partition");
        }
    }
}

/// Posts `events` in one of the three framings; returns the reply.
fn post(port: u16, events: &[Value], framing: usize) -> Reply {
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let auth = format!("Bearer {KEY}");
    match framing % 3 {
        0 if events.len() == 1 => http_post(
            &url,
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            events[0].to_string().as_bytes(),
        ),
        1 => {
            let body: String = events.iter().map(|e| format!("{e}\n")).collect();
            http_post(
                &url,
                &[("content-type", "application/x-ndjson"), ("x-api-key", KEY)],
                body.as_bytes(),
            )
        }
        _ => http_post(
            &url,
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            Value::Array(events.to_vec()).to_string().as_bytes(),
        ),
    }
}

/// A request of `n` serves plus a click on one ad of each serve that carries its own ID.
fn batch(rng: &mut Rng, ids: &AtomicU64, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..n {
        let own = rng
            .next_u64()
            .is_multiple_of(2)
            .then(|| (1i64 << 40) + ids.fetch_add(1, Ordering::Relaxed) as i64);
        let s = serve_json(rng, own);
        if let Some(id) = own {
            out.push(json!({"type": "click", "serve_id": id.to_string(),
                "ad_id": s["ads"][0]["ad_id"], "ts_ms": now_ms()}));
        }
        out.push(s);
    }
    out
}

#[test]
fn every_202_event_is_in_kafka_intact() {
    let (serves, clicks, port, _adapter) = adapter("ingest", &[]);
    let ids = Arc::new(AtomicU64::new(1));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (ids, accepted) = (ids.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t + 1);
                for r in 0..30 {
                    let n = [1, 10, 50][r % 3];
                    let events = batch(&mut rng, &ids, n);
                    let reply = post(port, &events, r + t as usize);
                    assert_eq!(reply.status, 202, "{}", reply.body);
                    accepted
                        .lock()
                        .unwrap()
                        .extend(accepted_of(&events, &reply.body));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let accepted = accepted.lock().unwrap();
    assert!(accepted.len() > 1_000, "{} events", accepted.len());
    assert_in_kafka_intact(&serves, &clicks, &accepted);
}

#[test]
fn bad_requests_get_a_clear_4xx_and_write_nothing() {
    let (serves, clicks, port, _adapter) = adapter(
        "ingest-bad",
        &["--max-body-bytes=65536", "--max-events=100"],
    );
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let mut rng = Rng(9);
    let good_v = serve_json(&mut rng, None);
    let good = good_v.to_string();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good_v.clone();
        f(&mut v);
        v.to_string()
    };
    let auth = format!("Bearer {KEY}");
    let json_auth = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let expect = |headers: &[(&str, &str)], body: &[u8], status: u16, says: &str| {
        let r = http_post(&url, headers, body);
        assert_eq!(r.status, status, "{says}: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
        let text = v.to_string();
        assert!(text.contains(says), "expected {says:?} in {text}");
    };

    // Keys.
    expect(
        &[("content-type", "application/json")],
        good.as_bytes(),
        401,
        "missing API key",
    );
    expect(
        &[
            ("authorization", "Bearer wrong"),
            ("content-type", "application/json"),
        ],
        good.as_bytes(),
        401,
        "invalid API key",
    );
    expect(
        &[("x-api-key", "")],
        good.as_bytes(),
        401,
        "invalid API key",
    );
    // Bodies.
    expect(
        &json_auth,
        b"{\"type\": \"serve\",",
        400,
        "body is not JSON",
    );
    expect(
        &json_auth,
        b"{\"type\":\"serve\xff\"}",
        400,
        "not valid UTF-8",
    );
    expect(
        &json_auth,
        b"17",
        400,
        "an event object, an array of events",
    );
    expect(&json_auth, b"[]", 400, "no events");
    let wrong_type = with(&|v| v["ads"][0]["position"] = json!("top"));
    expect(
        &json_auth,
        wrong_type.as_bytes(),
        400,
        "ads[0].position: invalid type",
    );
    let unknown = with(&|v| v["colour"] = json!("red"));
    expect(
        &json_auth,
        unknown.as_bytes(),
        400,
        "unknown field `colour`",
    );
    let missing = with(&|v| {
        v["ads"][0].as_object_mut().unwrap().remove("campaign_id");
    });
    expect(
        &json_auth,
        missing.as_bytes(),
        400,
        "missing field `campaign_id`",
    );
    let future = with(&|v| v["ts_ms"] = json!(now_ms() + 3_600_000));
    expect(&json_auth, future.as_bytes(), 400, "in the future");
    let past = with(&|v| v["ts_ms"] = json!(1_500_000_000_000i64));
    expect(&json_auth, past.as_bytes(), 400, "in the past");
    expect(
        &[
            ("content-type", "text/plain"),
            ("authorization", auth.as_str()),
        ],
        good.as_bytes(),
        415,
        "application/x-ndjson",
    );
    // One bad event among many: the whole request is refused, the bad one named.
    let mut events: Vec<String> = (0..40).map(|_| good.clone()).collect();
    events[17] = with(&|v| v["ads"][0]["bid"] = json!(-1.0));
    let body = format!("[{}]", events.join(","));
    expect(&json_auth, body.as_bytes(), 400, "\"index\":17");
    // Limits.
    let many = format!("[{}]", vec![good.as_str(); 101].join(","));
    expect(&json_auth, many.as_bytes(), 413, "at most 100");
    let huge = format!("[{}]", vec![good.as_str(); 400].join(","));
    expect(&json_auth, huge.as_bytes(), 413, "larger than 65536 bytes");

    // Nothing above reached Kafka; a good request afterwards does, exactly once.
    let r = http_post(&url, &json_auth, good.as_bytes());
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(read_topic(&serves).len(), 1);
    assert_eq!(read_topic(&clicks).len(), 0);

    // Every answer of the route was timed under its outcome, the refusals too; a path that is
    // not the route's is not.
    let nowhere = http_post(
        &format!("http://127.0.0.1:{port}/v1/nowhere"),
        &json_auth,
        good.as_bytes(),
    );
    assert_eq!(nowhere.status, 404, "{}", nowhere.body);
    let page = http_get(&format!("http://127.0.0.1:{port}/metrics")).unwrap();
    let answers = |outcome: &str| {
        metric_sum_where(
            &page,
            "ctr_ingest_request_seconds_count",
            &[r#"route="events""#, &format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!(answers("refused"), Some(16.0), "{page}");
    assert_eq!(answers("ok"), Some(1.0), "{page}");
}

#[test]
fn a_burst_beyond_capacity_gets_503_and_loses_nothing_accepted() {
    let (serves, clicks, port, _adapter) = adapter(
        "ingest-burst",
        &[
            "--max-in-flight-events=300",
            "--max-events=200",
            "--linger-ms=20",
        ],
    );
    let ids = Arc::new(AtomicU64::new(1));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let threads: Vec<_> = (0..24)
        .map(|t| {
            let (ids, accepted, statuses) = (ids.clone(), accepted.clone(), statuses.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(100 + t);
                for r in 0..8 {
                    let events = batch(&mut rng, &ids, 60);
                    let reply = post(port, &events, 2);
                    *statuses.lock().unwrap().entry(reply.status).or_default() += 1;
                    match reply.status {
                        202 => accepted
                            .lock()
                            .unwrap()
                            .extend(accepted_of(&events, &reply.body)),
                        503 => {
                            assert_eq!(reply.retry_after.as_deref(), Some("1"));
                            assert!(reply.body.contains("queue full"), "{}", reply.body);
                        }
                        s => panic!("unexpected status {s} in round {r}: {}", reply.body),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0
            && statuses.get(&202).copied().unwrap_or(0) > 0,
        "a burst of 24 x 90-event requests against a 300-event budget: {statuses:?}"
    );
    let accepted = accepted.lock().unwrap();
    assert_in_kafka_intact(&serves, &clicks, &accepted);
}

/// Every record of a topic, decoded, in a canonical order.
fn decoded<E: ctr_schemas::WireEvent + std::fmt::Debug>(topic: &str) -> Vec<String> {
    let mut v: Vec<String> = read_topic(topic)
        .iter()
        .map(|r| {
            format!(
                "{:?}",
                ctr_schemas::decode::<E>(&r.payload).expect("decodes")
            )
        })
        .collect();
    v.sort();
    v
}

fn run_ingest(args: &[String]) -> Service {
    Service::start("ingest-cli", "ctr-ingest", args)
}

#[test]
fn export_then_replay_reproduces_the_topics() {
    let (serves, clicks) = ingest_topics("replay-src");
    let (serves2, clicks2) = ingest_topics("replay-dst");
    run_ingest(&[
        "simulate".into(),
        format!("--brokers={}", brokers()),
        format!("--serves-topic={serves}"),
        format!("--clicks-topic={clicks}"),
        "--serves=3000".into(),
        "--rate=0".into(),
        "--seed=77".into(),
    ])
    .wait_success(Duration::from_secs(60));
    let dir = std::env::temp_dir().join(unique("export"));
    std::fs::create_dir_all(&dir).unwrap();
    for (topic, kind, file) in [(&serves, "serve", "s.avro"), (&clicks, "click", "c.avro")] {
        run_ingest(&[
            "export".into(),
            format!("--brokers={}", brokers()),
            format!("--topic={topic}"),
            format!("--kind={kind}"),
            format!("--out={}", dir.join(file).display()),
        ])
        .wait_success(Duration::from_secs(60));
    }
    run_ingest(&[
        "replay".into(),
        format!("--brokers={}", brokers()),
        format!("--serves-topic={serves2}"),
        format!("--clicks-topic={clicks2}"),
        "--speed=max".into(),
        dir.join("s.avro").display().to_string(),
        dir.join("c.avro").display().to_string(),
    ])
    .wait_success(Duration::from_secs(60));
    let original = decoded::<Serve>(&serves);
    assert!(original.len() == 3_000, "{} serves", original.len());
    // Compared by count first, so a failure does not print thousands of records.
    let replayed = decoded::<Serve>(&serves2);
    assert_eq!(replayed.len(), original.len(), "serves replayed");
    assert!(replayed == original, "serves replayed intact");
    let (c1, c2) = (decoded::<Click>(&clicks), decoded::<Click>(&clicks2));
    assert_eq!(c2.len(), c1.len(), "clicks replayed");
    assert!(c1 == c2, "clicks replayed intact");
}

#[test]
fn jsonl_replay_keeps_the_pace_and_stops_at_a_bad_line() {
    let (serves, clicks) = ingest_topics("replay-jsonl");
    let dir = std::env::temp_dir().join(unique("jsonl"));
    std::fs::create_dir_all(&dir).unwrap();
    let t0 = 1_760_000_000_000i64;
    let mut lines = Vec::new();
    for i in 0..30i64 {
        // 30 serves over 3 s of event time, each with a click 100 ms later.
        let id = 1_000 + i;
        lines.push(
            json!({"type": "serve", "serve_id": id, "ts_ms": t0 + i * 100,
            "context": {"query_category": "travel", "geo": "US", "device": "mobile"},
            "ads": [{"ad_id": "ad-1", "campaign_id": "c", "position": 1, "bid": 1.0}]}),
        );
        lines.push(
            json!({"type": "click", "click_id": 5_000 + i, "serve_id": id,
            "ad_id": "ad-1", "ts_ms": t0 + i * 100 + 100}),
        );
    }
    let file = dir.join("events.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, &text).unwrap();
    let replay = |extra: &[&str], path: &std::path::Path| {
        let mut args = vec![
            "replay".to_string(),
            format!("--brokers={}", brokers()),
            format!("--serves-topic={serves}"),
            format!("--clicks-topic={clicks}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(path.display().to_string());
        run_ingest(&args)
    };
    // At the original pace the 3 s of recorded time take at least 2.9 s of wall time.
    let started = std::time::Instant::now();
    replay(&["--speed=1", "--retime"], &file).wait_success(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2_900), "replayed in {took:?}");
    let s: Vec<Serve> = read_topic(&serves)
        .iter()
        .map(|r| ctr_schemas::decode(&r.payload).unwrap())
        .collect();
    assert_eq!(s.len(), 30);
    // Retimed: the recording now starts about now, gaps kept.
    let first = s.iter().map(|s| s.ts_ms).min().unwrap();
    let last = s.iter().map(|s| s.ts_ms).max().unwrap();
    assert!((now_ms() - first).abs() < 60_000, "retimed to now");
    assert_eq!(last - first, 2_900);

    // A bad line stops the replay with its line number; --skip-invalid counts and goes on.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{}\n{{\"type\":\"click\"}}\n", lines[0], lines[1]),
    )
    .unwrap();
    let mut svc = replay(&["--speed=max"], &bad);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while svc.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!svc.is_running());
    assert!(
        svc.output().contains("line 3: missing field `serve_id`"),
        "{}",
        svc.output()
    );
    replay(&["--speed=max", "--skip-invalid"], &bad).wait_success(Duration::from_secs(30));
}

/// The Python example (confluent-kafka + fastavro) produces straight to Kafka in the project's
/// wire format; the joiner and scorer consume it and publish exactly its per-ad counts.
#[test]
fn python_producer_events_are_consumed_and_scored() {
    use crate::pipeline::{assert_published_exactly, expected, feedback, scorer, topics};
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("CTR_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo.join(".run/venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run `scripts/python-env` (scripts/test does)",
        python.display()
    );
    let t = topics("python");
    let prefix = format!("{}:", unique("py"));
    let port = free_port();
    let feedback = feedback(&t);
    let scorer = scorer(&t, &prefix, port);
    let dir = std::env::temp_dir().join(unique("python"));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = dir.join("counts.json");
    let out = std::process::Command::new(&python)
        .arg(repo.join("ingest/examples/python/produce_avro.py"))
        .args([
            format!("--brokers={}", brokers()),
            format!("--serves-topic={}", t.serves),
            format!("--clicks-topic={}", t.clicks),
            "--serves=2000".into(),
            "--start-ms=1760000000000".into(),
            format!("--counts-out={}", counts.display()),
        ])
        .output()
        .expect("running the Python producer");
    assert!(
        out.status.success(),
        "Python producer failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expected(&counts);
    assert_eq!(want.len(), 10, "ten Python ads");
    assert!(want.values().map(|c| c.1).sum::<u64>() > 50, "with clicks");
    assert_published_exactly(&prefix, &want, &[&feedback, &scorer]);
    // Scored: the ranking API answers for a Python ad from its own evidence.
    let body = http_get(&format!(
        "http://127.0.0.1:{port}/v1/ctr?ad_id=py-ad-9&query_category=travel&geo=US&device=mobile&source=python"
    ))
    .expect("GET /v1/ctr");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["source"], "exact", "{body}");
    let (imps, pctr) = (
        v["impressions"].as_u64().unwrap(),
        v["pctr"].as_f64().unwrap(),
    );
    assert!(imps > 0 && imps < want["py-ad-9"].0, "{body}");
    assert!(pctr > 0.0 && pctr < 1.0, "{body}");
}
