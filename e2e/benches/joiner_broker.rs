//! The joiner through the real broker (issue #4), against a bare rdkafka consumer reading the
//! same input in the same run.
//!
//! Run (stack up, binaries built): `cargo bench -p ctr-e2e --bench joiner_broker`
//!
//! Input: 300,000 serves (3 ads each) and a click on 3% of them, on 4 + 4 partitions. The bare
//! consumer reads both topics to the end; the joiner is timed from partition assignment until
//! its counters show every serve consumed (`ctr_feedback_events{kind="serves"}`, published once a
//! second, so the figure is conservative by up to a second).

use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::{AdShown, Click, Context, Encoder, Serve};

const SERVES: i64 = 300_000;

fn main() {
    let base = unique("bench");
    let (serves, clicks) = (format!("{base}.serves"), format!("{base}.clicks"));
    let (labeled, dl) = (format!("{base}.labeled"), format!("{base}.dl"));
    create_topics(&[(&serves, 4), (&clicks, 4), (&labeled, 4), (&dl, 1)]);
    let mut se = Encoder::<Serve>::new();
    let mut ce = Encoder::<Click>::new();
    let mut records = Vec::with_capacity(SERVES as usize * 2);
    let t0 = 1_760_000_000_000i64;
    for i in 0..SERVES {
        let s = Serve {
            serve_id: 1_000_000 + i,
            ts_ms: t0 + i / 10,
            context: Context {
                query_category: "q".into(),
                geo: "US".into(),
                device: "mobile".into(),
                extra: Default::default(),
            },
            ads: (0..3)
                .map(|k| AdShown {
                    ad_id: format!("ad-{}", (i * 7 + k * 13) % 10_000),
                    campaign_id: "c".into(),
                    position: k as i32 + 1,
                    bid: 1.0,
                })
                .collect(),
        };
        records.push((
            serves.clone(),
            s.serve_id.to_string(),
            se.encode(&s).unwrap(),
        ));
        if i % 33 == 0 {
            let c = Click {
                click_id: i + 1,
                serve_id: s.serve_id,
                ad_id: s.ads[0].ad_id.clone(),
                ts_ms: s.ts_ms + 500,
            };
            records.push((
                clicks.clone(),
                s.serve_id.to_string(),
                ce.encode(&c).unwrap(),
            ));
        }
    }
    let total = records.len();
    let started = Instant::now();
    produce_all(&records);
    eprintln!(
        "produced {total} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Bare consumer over the same input.
    let bare = bare_consume_rate(&[&serves, &clicks], 4, total);

    let port = free_port();
    let joiner = start_feedback(
        [&serves, &clicks, &labeled, &dl],
        &unique("g"),
        &format!("{base}:"),
        &redis_url(),
        port,
        &[],
    );
    let metrics = |name: &str| {
        http_get(&format!("http://127.0.0.1:{port}/metrics")).and_then(|p| metric(&p, name))
    };
    eventually(
        Duration::from_secs(60),
        "assignment",
        || metrics("ctr_feedback_assigned_partitions").filter(|v| *v > 0.0),
        || joiner.output(),
    );
    let started = Instant::now();
    eventually(
        Duration::from_secs(600),
        "all serves consumed",
        || metrics("ctr_feedback_events{kind=\"serves\"}").filter(|v| *v as i64 >= SERVES),
        || joiner.output(),
    );
    let secs = started.elapsed().as_secs_f64();
    let joined = total as f64 / secs;
    joiner.stop();
    println!("bare consumer: {bare:.0} events/s");
    println!(
        "joiner (consume, join, produce ~3 labels per serve, checkpoint): {joined:.0} events/s"
    );
    println!("ratio joiner / bare consumer: {:.2}", joined / bare);
}
