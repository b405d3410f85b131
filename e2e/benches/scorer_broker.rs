//! The scorer through the real broker and Redis (issue #5), against a bare rdkafka consumer
//! reading the same topic in the same run; and freshness: click production to the changed
//! pCTR readable in Redis.
//!
//! Run (stack up, release binaries built: `cargo build --release --workspace --bins`):
//! `cargo bench -p ctr-e2e --bench scorer_broker`
//!
//! Throughput input: 300,000 labels (plus re-emitted duplicates and late clicks) over 60 ads
//! on 4 partitions, produced before either reader starts. The scorer runs with its defaults
//! (counts, FTRL and combined learning side by side; shedding off so every record is learned)
//! and is timed from partition assignment until its records counter covers the topic
//! (exported once a second: conservative by up to a second).

use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::{Encoder, LabeledImpression};

fn scorer(topic: &str, prefix: &str, port: u16, extra: &[&str]) -> Service {
    start_scorer(topic, &format!("{prefix}g"), prefix, port, extra)
}

fn throughput() {
    let topic = format!("{}.labeled", unique("bench"));
    create_topics(&[(&topic, 4)]);
    let stream = labeled_stream(&topic, 300_000, 60, 5);
    let total = stream.records.len();
    let started = Instant::now();
    produce_all(&stream.records);
    eprintln!(
        "produced {total} labels in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bare = bare_consume_rate(&[&topic], 4, total);
    let port = free_port();
    let prefix = format!("{}:", unique("bench"));
    let s = scorer(&topic, &prefix, port, &["--shedding=false"]);
    let metrics = |name: &str| {
        http_get(&format!("http://127.0.0.1:{port}/metrics")).and_then(|p| metric(&p, name))
    };
    eventually(
        Duration::from_secs(60),
        "assignment",
        || metrics("ctr_scorer_assigned_partitions").filter(|v| *v > 0.0),
        || s.output(),
    );
    let started = Instant::now();
    eventually(
        Duration::from_secs(600),
        "every label consumed",
        || scorer_records(port).filter(|v| *v as usize >= total),
        || s.output(),
    );
    let scored = total as f64 / started.elapsed().as_secs_f64();
    s.stop();
    println!("bare consumer: {bare:.0} labels/s");
    println!("scorer (decode, dedupe, learn 3 variants, publish to Redis): {scored:.0} labels/s");
    println!("ratio scorer / bare consumer: {:.2}", scored / bare);
}

/// Produces one click label at a time at a steady background load and measures from the send
/// (on an already connected producer) until its ad's `clicks` total in Redis moves (the same
/// write carries the new pCTR). The time includes the producer's acknowledgement.
fn freshness() {
    let topic = format!("{}.labeled", unique("fresh"));
    create_topics(&[(&topic, 4)]);
    let port = free_port();
    let prefix = format!("{}:", unique("fresh"));
    let s = scorer(&topic, &prefix, port, &[]);
    eventually(
        Duration::from_secs(60),
        "assignment",
        || {
            http_get(&format!("http://127.0.0.1:{port}/metrics"))
                .and_then(|p| metric(&p, "ctr_scorer_assigned_partitions"))
                .filter(|v| *v >= 4.0)
        },
        || s.output(),
    );
    // Background: 2,000 labels/s of other ads from another thread.
    let bg = Background::start(&topic, 100, true);
    let mut enc = Encoder::<LabeledImpression>::new();
    let mut con = redis();
    let producer = producer();
    let mut delays = Vec::new();
    let mut acks = Vec::new();
    for i in 0..200i64 {
        let ad = format!("fresh-{}", i % 8);
        let key = ctr_schemas::contract::keys::ad(&prefix, &ad);
        let before: Option<u64> = redis::cmd("HGET")
            .arg(&key)
            .arg("clicks")
            .query(&mut con)
            .unwrap();
        let l = single_label(90_000_000 + i, &ad, "c", true, LABELS_T0 + i * 1_000);
        let payload = enc.encode(&l).unwrap();
        let started = Instant::now();
        acks.push(send_acked(&producer, &topic, &ad, &payload));
        loop {
            let now: Option<u64> = redis::cmd("HGET")
                .arg(&key)
                .arg("clicks")
                .query(&mut con)
                .unwrap();
            if now.unwrap_or(0) > before.unwrap_or(0) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "click never published"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        delays.push(started.elapsed().as_secs_f64() * 1e3);
    }
    bg.stop();
    s.stop();
    delays.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    let q = |f: f64| delays[((delays.len() as f64 - 1.0) * f) as usize];
    println!(
        "of which the producer's acknowledgement: p50 {:.1} ms, p99 {:.1} ms",
        acks[acks.len() / 2],
        acks[acks.len() * 99 / 100]
    );
    println!(
        "freshness (produce → pCTR in Redis) at ~2,000 labels/s background, batch 20 ms: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        q(0.5),
        q(0.99),
        q(1.0)
    );
}

fn main() {
    throughput();
    freshness();
}
