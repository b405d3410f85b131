//! The ingest paths through the real broker (issue #6), each against the broker's raw produce
//! rate measured in the same run: a bare rdkafka producer sending pre-encoded serves with the
//! project's settings (idempotent, acks=all, murmur2_random).
//!
//! Run (stack up, `cargo build --release --workspace --bins` first):
//! `cargo bench -p ctr-e2e --bench ingest_broker`
//!
//! - `ctr-ingest simulate --rate 0`: simulate, encode, produce, await every acknowledgement;
//! - `ctr-ingest replay --speed max` of a JSONL file: parse, validate, encode, produce;
//! - `ctr-ingest http`: POST /v1/events from 16 client threads (keep-alive), batches of 100 and
//!   of 1; each request answered only after the broker acknowledged its events. The clients
//!   run on the same 2 cores as the adapter and the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::{AdShown, Context, Encoder, Serve};

const SERVES: i64 = 200_000;
const KEY: &str = "bench-key";

fn serve(i: i64) -> Serve {
    Serve {
        serve_id: 1_000_000 + i,
        ts_ms: 1_760_000_000_000 + i,
        context: Context {
            query_category: "travel".into(),
            geo: "US".into(),
            device: "mobile".into(),
            extra: [("hour".to_string(), "13".to_string())].into(),
        },
        ads: (0..3)
            .map(|k| AdShown {
                ad_id: format!("ad-{:05}", (i * 7 + k * 13) % 10_000),
                campaign_id: "camp-0001".into(),
                position: k as i32 + 1,
                bid: 1.25,
            })
            .collect(),
    }
}

fn serve_json(i: i64, with_id: bool) -> String {
    let s = serve(i);
    let ads: Vec<String> = s
        .ads
        .iter()
        .map(|a| {
            format!(
                r#"{{"ad_id":"{}","campaign_id":"{}","position":{},"bid":{}}}"#,
                a.ad_id, a.campaign_id, a.position, a.bid
            )
        })
        .collect();
    let id = if with_id {
        format!(r#""serve_id":{},"ts_ms":{},"#, s.serve_id, s.ts_ms)
    } else {
        String::new()
    };
    format!(
        r#"{{"type":"serve",{id}"context":{{"query_category":"travel","geo":"US","device":"mobile","hour":"13"}},"ads":[{}]}}"#,
        ads.join(",")
    )
}

fn timed(svc: Service, timeout: Duration) -> f64 {
    let started = Instant::now();
    svc.wait_success(timeout);
    started.elapsed().as_secs_f64()
}

/// Posts `batch`-event requests from `threads` clients for `secs`; returns (req/s, events/s,
/// non-202 answers).
fn drive(port: u16, threads: usize, batch: usize, secs: u64) -> (f64, f64, u64) {
    let body = Arc::new(if batch == 1 {
        serve_json(0, false)
    } else {
        format!(
            "[{}]",
            (0..batch as i64)
                .map(|i| serve_json(i, false))
                .collect::<Vec<_>>()
                .join(",")
        )
    });
    let (ok, bad, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (body, ok, bad, stop, url) = (
                body.clone(),
                ok.clone(),
                bad.clone(),
                stop.clone(),
                url.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = http_post(
                        &url,
                        &[("content-type", "application/json"), ("x-api-key", KEY)],
                        body.as_bytes(),
                    );
                    if r.status == 202 { &ok } else { &bad }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reqs = ok.load(Ordering::Relaxed) as f64 / elapsed;
    (reqs, reqs * batch as f64, bad.load(Ordering::Relaxed))
}

fn main() {
    let base = unique("ibench");
    let topics: Vec<String> = [
        "raw", "sim.s", "sim.c", "rep.s", "rep.c", "http.s", "http.c",
    ]
    .iter()
    .map(|t| format!("{base}.{t}"))
    .collect();
    let pairs: Vec<(&str, i32)> = topics.iter().map(|t| (t.as_str(), 4)).collect();
    create_topics(&pairs);

    // Raw: the broker's produce rate for pre-encoded serves.
    let mut enc = Encoder::<Serve>::new();
    let records: Vec<(String, String, Vec<u8>)> = (0..SERVES)
        .map(|i| {
            let s = serve(i);
            (
                topics[0].clone(),
                s.serve_id.to_string(),
                enc.encode(&s).unwrap(),
            )
        })
        .collect();
    let started = Instant::now();
    produce_all(&records);
    let raw = SERVES as f64 / started.elapsed().as_secs_f64();
    println!("raw producer (pre-encoded serves, idempotent, acks=all): {raw:.0} events/s");

    // simulate --rate 0.
    let dir = std::env::temp_dir().join(unique("ibench"));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = dir.join("counts.json");
    let secs = timed(
        Service::start(
            "simulate",
            "ctr-ingest",
            &[
                "simulate".into(),
                format!("--brokers={}", brokers()),
                format!("--serves-topic={}", topics[1]),
                format!("--clicks-topic={}", topics[2]),
                format!("--serves={SERVES}"),
                "--rate=0".into(),
                format!("--counts-out={}", counts.display()),
            ],
        ),
        Duration::from_secs(600),
    );
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&counts).unwrap()).unwrap();
    let events = ["serves", "clicks", "duplicate_clicks", "orphan_clicks"]
        .iter()
        .map(|k| c[k].as_u64().unwrap())
        .sum::<u64>() as f64;
    let sim = events / secs;
    println!(
        "ctr-ingest simulate --rate 0: {sim:.0} events/s ({events} events), ratio to raw {:.2}",
        sim / raw
    );

    // replay --speed max of a JSONL file.
    let file = dir.join("serves.jsonl");
    let text: String = (0..SERVES).map(|i| serve_json(i, true) + "\n").collect();
    std::fs::write(&file, text).unwrap();
    let secs = timed(
        Service::start(
            "replay",
            "ctr-ingest",
            &[
                "replay".into(),
                format!("--brokers={}", brokers()),
                format!("--serves-topic={}", topics[3]),
                format!("--clicks-topic={}", topics[4]),
                "--speed=max".into(),
                "--no-progress".into(),
                file.display().to_string(),
            ],
        ),
        Duration::from_secs(600),
    );
    let rep = SERVES as f64 / secs;
    println!(
        "ctr-ingest replay --speed max (JSONL): {rep:.0} events/s, ratio to raw {:.2}",
        rep / raw
    );

    // The HTTP adapter.
    let port = free_port();
    let adapter = start_ingest(
        &topics[5],
        &topics[6],
        port,
        &[&format!("--api-keys={KEY}")],
    );
    for (threads, batch) in [(16, 100), (16, 1), (1, 1)] {
        drive(port, threads, batch, 2); // warm-up
        let (reqs, evs, bad) = drive(port, threads, batch, 10);
        println!(
            "ctr-ingest http, {threads} clients, batch {batch}: {reqs:.0} req/s, {evs:.0} events/s, \
             ratio to raw {:.2}, non-202 {bad}",
            evs / raw
        );
    }
    adapter.stop();
}
