//! simulate → Kafka → feedback → Kafka → scorer → Redis, with exact counts (issue #2).

use std::collections::BTreeMap;
use std::time::Duration;

use ctr_e2e::*;

pub(crate) struct Topics {
    pub(crate) serves: String,
    pub(crate) clicks: String,
    pub(crate) labeled: String,
    pub(crate) deadletter: String,
}

pub(crate) fn topics(tag: &str) -> Topics {
    let base = unique(tag);
    let t = Topics {
        serves: format!("{base}.serves"),
        clicks: format!("{base}.clicks"),
        labeled: format!("{base}.labeled"),
        deadletter: format!("{base}.deadletter"),
    };
    create_topics(&[
        (&t.serves, 4),
        (&t.clicks, 4),
        (&t.labeled, 4),
        (&t.deadletter, 1),
    ]);
    t
}

pub(crate) fn simulate(t: &Topics, serves: u64, counts_out: &std::path::Path) -> Service {
    simulate_at_rate(t, serves, 0, counts_out, &[])
}

/// [`simulate`] at `rate` serves per wall-clock second (0: as fast as the broker takes them).
pub(crate) fn simulate_at_rate(
    t: &Topics,
    serves: u64,
    rate: u32,
    counts_out: &std::path::Path,
    extra: &[&str],
) -> Service {
    let mut args: Vec<String> = vec![
        "simulate".into(),
        format!("--brokers={}", brokers()),
        format!("--serves-topic={}", t.serves),
        format!("--clicks-topic={}", t.clicks),
        "--seed=2024".into(),
        format!("--serves={serves}"),
        format!("--rate={rate}"),
        "--sim-rate=2000".into(),
        "--start-ms=1760000000000".into(),
        "--click-delay-min-ms=50".into(),
        "--click-delay-max-ms=3000".into(),
        format!("--counts-out={}", counts_out.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start("simulate", "ctr-ingest", &args)
}

pub(crate) fn feedback(t: &Topics) -> Service {
    feedback_at(t, &redis_url())
}

/// [`feedback`] with its own Redis URL (an ACL user, say).
pub(crate) fn feedback_at(t: &Topics, redis_url: &str) -> Service {
    feedback_with(t, redis_url, &[])
}

/// [`feedback_at`] with `extra` flags after the fast-join ones.
pub(crate) fn feedback_with(t: &Topics, redis_url: &str, extra: &[&str]) -> Service {
    let mut flags = FAST_JOIN.to_vec();
    flags.extend_from_slice(extra);
    start_feedback(
        [&t.serves, &t.clicks, &t.labeled, &t.deadletter],
        &format!("{}-feedback", t.serves),
        &format!("{}:", t.serves),
        redis_url,
        free_port(),
        &flags,
    )
}

pub(crate) fn scorer(t: &Topics, prefix: &str, port: u16) -> Service {
    scorer_at(t, prefix, port, &redis_url())
}

/// [`scorer`] with its own Redis URL.
pub(crate) fn scorer_at(t: &Topics, prefix: &str, port: u16, redis_url: &str) -> Service {
    scorer_with(t, prefix, port, redis_url, &[])
}

/// [`scorer_at`] with `extra` flags.
pub(crate) fn scorer_with(
    t: &Topics,
    prefix: &str,
    port: u16,
    redis_url: &str,
    extra: &[&str],
) -> Service {
    let mut args = vec![
        format!("--brokers={}", brokers()),
        format!("--labeled-topic={}", t.labeled),
        format!("--deadletter-topic={}", t.deadletter),
        format!("--group={}-scorer", t.labeled),
        format!("--redis-url={redis_url}"),
        format!("--redis-prefix={prefix}"),
        format!("--http-addr=127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start(&format!("scorer:{port}"), "ctr-scorer", &args)
}

pub(crate) fn expected(counts_out: &std::path::Path) -> BTreeMap<String, (u64, u64)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(counts_out).unwrap()).unwrap();
    v["ads"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(ad, c)| {
            (
                ad.clone(),
                (
                    c["impressions"].as_u64().unwrap(),
                    c["clicks"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Waits until Redis holds exactly the expected per-ad counts.
pub(crate) fn assert_published_exactly(
    prefix: &str,
    want: &BTreeMap<String, (u64, u64)>,
    services: &[&Service],
) {
    assert_published_exactly_at(&redis_url(), prefix, want, services);
}

/// [`assert_published_exactly`] in the Redis at `url`.
pub(crate) fn assert_published_exactly_at(
    url: &str,
    prefix: &str,
    want: &BTreeMap<String, (u64, u64)>,
    services: &[&Service],
) {
    let mut con = redis_at(url).expect("Redis answers");
    let total: u64 = want.values().map(|c| c.0).sum();
    let seen = std::cell::Cell::new(0u64);
    let got = eventually(
        Duration::from_secs(120),
        "Redis per-ad counts to reach the simulator's totals",
        || {
            let now = published_ad_counts(&mut con, prefix);
            seen.set(now.values().map(|c| c.0).sum());
            (seen.get() >= total).then_some(now)
        },
        || {
            let seen = seen.get();
            let logs: Vec<String> = services
                .iter()
                .map(|s| format!("--- {}\n{}", s.name, s.output()))
                .collect();
            format!(
                "impressions in Redis {seen} of {total}\n{}",
                logs.join("\n")
            )
        },
    );
    // A little longer: nothing beyond the truth may arrive either.
    std::thread::sleep(Duration::from_secs(2));
    let got_after = published_ad_counts(&mut con, prefix);
    assert_eq!(
        got, got_after,
        "counts kept changing after reaching the total"
    );
    assert_eq!(
        &got, want,
        "per-ad (impressions, clicks) in Redis differ from what was emitted"
    );
}

#[test]
fn simulated_traffic_reaches_redis_exactly() {
    let t = topics("e2e");
    let dir = std::env::temp_dir().join(unique("counts"));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = dir.join("counts.json");
    let prefix = format!("{}:", unique("ctr"));
    let port = free_port();
    let feedback = feedback(&t);
    let scorer = scorer(&t, &prefix, port);
    simulate(&t, 4_000, &counts).wait_success(Duration::from_secs(120));
    let want = expected(&counts);
    assert!(
        want.values().map(|c| c.1).sum::<u64>() > 50,
        "the run should contain clicks"
    );
    assert_published_exactly(&prefix, &want, &[&feedback, &scorer]);

    // The API answers from the same data: exact context, backed off, and prior.
    let (ad, (imps, clicks)) = want.iter().max_by_key(|(_, c)| c.0).unwrap();
    let body = http_get(&format!(
        "http://127.0.0.1:{port}/v1/ctr?ad_id={ad}&query_category=nope&geo=US&device=mobile"
    ))
    .expect("GET /v1/ctr");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["source"], "backed_off", "{body}");
    assert_eq!(
        (v["impressions"].as_u64(), v["clicks"].as_u64()),
        (Some(*imps), Some(*clicks))
    );
    let body = http_get(&format!(
        "http://127.0.0.1:{port}/v1/ctr?ad_id=never-seen&query_category=travel&geo=US&device=mobile"
    ))
    .unwrap();
    assert!(body.contains("\"source\":\"prior\""), "{body}");
    let bad = ureq::get(&format!("http://127.0.0.1:{port}/v1/ctr?ad_id=x")).call();
    assert!(matches!(bad, Err(ureq::Error::StatusCode(400))), "{bad:?}");
    scorer.stop();
    feedback.stop();
}

#[test]
fn two_scorers_share_partitions_and_stay_exact() {
    let t = topics("two");
    let dir = std::env::temp_dir().join(unique("counts"));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = dir.join("counts.json");
    let prefix = format!("{}:", unique("ctr"));
    let (p1, p2) = (free_port(), free_port());
    let s1 = scorer(&t, &prefix, p1);
    let s2 = scorer(&t, &prefix, p2);
    // Both members must hold partitions before traffic starts, so both do real work.
    for (port, s) in [(p1, &s1), (p2, &s2)] {
        eventually(
            Duration::from_secs(60),
            "both scorers to be assigned partitions",
            || {
                let page = http_get(&format!("http://127.0.0.1:{port}/metrics"))?;
                let a = metric(&page, "ctr_scorer_assigned_partitions")?;
                let other = if port == p1 { p2 } else { p1 };
                let b = metric(
                    &http_get(&format!("http://127.0.0.1:{other}/metrics"))?,
                    "ctr_scorer_assigned_partitions",
                )?;
                (a >= 1.0 && b >= 1.0 && a + b == 4.0).then_some(())
            },
            || s.output(),
        );
    }
    let feedback = feedback(&t);
    simulate(&t, 3_000, &counts).wait_success(Duration::from_secs(120));
    let want = expected(&counts);
    assert_published_exactly(&prefix, &want, &[&feedback, &s1, &s2]);
    let applied = |port| {
        let page = http_get(&format!("http://127.0.0.1:{port}/metrics")).unwrap();
        metric(&page, "ctr_scorer_applied_total").unwrap_or(0.0)
    };
    let (a1, a2) = (applied(p1), applied(p2));
    let total: u64 = want.values().map(|c| c.0).sum();
    assert!(
        a1 > 0.0 && a2 > 0.0,
        "both scorers applied records: {a1} and {a2}"
    );
    assert_eq!(
        (a1 + a2) as u64,
        total,
        "each labeled impression applied exactly once"
    );
    s1.stop();
    s2.stop();
    feedback.stop();
}
