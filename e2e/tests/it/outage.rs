//! A dependency that hangs (issue 17): Redis frozen with SIGSTOP mid-stream, as a stalled disk,
//! a long fork or a network partition looks. Shorter than the outage budget, the joiner and the
//! scorer ride it out and catch up by themselves (their consumer groups dropped them after
//! `max.poll.interval.ms`; they rejoin and restore what the rebalance took); longer, they exit
//! non-zero within the documented time instead of staying alive and idle, and a restart ends
//! exact. Before, the joiner's HTTP endpoint held its process up after its loop had failed:
//! alive, `/metrics` answering, labeling nothing.
//!
//! Each test freezes a Redis of its own ([`PrivateRedis`]), never the shared one.

use std::time::{Duration, Instant};

use ctr_e2e::*;

use crate::pipeline::{Topics, assert_published_exactly_at, expected, simulate_at_rate, topics};

/// The joiner on `redis`, with the dependency policy `policy`.
fn start_joiner(t: &Topics, redis: &PrivateRedis, policy: &[&str]) -> Service {
    let mut extra = FAST_JOIN.to_vec();
    extra.extend_from_slice(policy);
    start_feedback(
        [&t.serves, &t.clicks, &t.labeled, &t.deadletter],
        &format!("{}-feedback", t.serves),
        &format!("{}:", t.serves),
        &redis.url(),
        free_port(),
        &extra,
    )
}

/// A scorer on `redis`, with the dependency policy `policy`.
fn start_scorer_on(
    t: &Topics,
    redis: &PrivateRedis,
    prefix: &str,
    port: u16,
    policy: &[&str],
) -> Service {
    let mut args = vec![
        format!("--brokers={}", brokers()),
        format!("--labeled-topic={}", t.labeled),
        format!("--deadletter-topic={}", t.deadletter),
        format!("--group={}-scorer", t.labeled),
        format!("--redis-url={}", redis.url()),
        format!("--redis-prefix={prefix}"),
        format!("--http-addr=127.0.0.1:{port}"),
    ];
    args.extend(policy.iter().map(|s| s.to_string()));
    Service::start(&format!("scorer:{port}"), "ctr-scorer", &args)
}

fn counts_file() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("counts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("counts.json")
}

#[test]
fn a_redis_freeze_within_the_budget_is_ridden_out_and_the_totals_end_exact() {
    let redis = PrivateRedis::start();
    let t = topics("freeze-short");
    let prefix = format!("{}:", unique("ctr"));
    let port = free_port();
    // 15 s frozen against a 40 s budget: longer than the consumer groups' poll interval (10 s),
    // so both services are dropped from their groups and must rejoin.
    let policy = ["--call-timeout-ms=2000", "--outage-budget-ms=40000"];
    let mut feedback = start_joiner(&t, &redis, &policy);
    let mut scorer = start_scorer_on(&t, &redis, &prefix, port, &policy);
    let counts = counts_file();
    let sim = simulate_at_rate(&t, 6_000, 200, &counts);
    std::thread::sleep(Duration::from_secs(8));
    redis.freeze();
    std::thread::sleep(Duration::from_secs(15));
    redis.thaw();
    sim.wait_success(Duration::from_secs(120));
    let want = expected(&counts);
    assert_published_exactly_at(&redis.url(), &prefix, &want, &[&feedback, &scorer]);
    for s in [&mut feedback, &mut scorer] {
        assert!(s.is_running(), "{} stopped:\n{}", s.name, s.output());
        assert!(
            s.output().contains("dependency answers again"),
            "{} did not go through the outage:\n{}",
            s.name,
            s.output()
        );
    }
    // Alive and working again, and it says so.
    let health = http_get(&format!("http://127.0.0.1:{port}/healthz"));
    assert_eq!(health.as_deref(), Some("ok"));
    scorer.stop();
    feedback.stop();
}

#[test]
fn a_redis_freeze_past_the_budget_ends_the_services_non_zero_and_a_restart_ends_exact() {
    let redis = PrivateRedis::start();
    let t = topics("freeze-long");
    let prefix = format!("{}:", unique("ctr"));
    let policy = ["--call-timeout-ms=1000", "--outage-budget-ms=5000"];
    let mut feedback = start_joiner(&t, &redis, &policy);
    let mut scorer = start_scorer_on(&t, &redis, &prefix, free_port(), &policy);
    let counts = counts_file();
    let sim = simulate_at_rate(&t, 6_000, 200, &counts);
    std::thread::sleep(Duration::from_secs(8));
    redis.freeze();
    let frozen = Instant::now();
    // The documented bound: the budget, one call, then the drain (itself at most the budget
    // and two calls): 2 × 5 s + 3 × 1 s = 13 s. The machine is shared; allow it 10 s more.
    for s in [&mut feedback, &mut scorer] {
        let deadline = frozen + Duration::from_secs(23);
        let status = loop {
            if let Some(status) = s.exit_status() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running {:.0} s after Redis froze:\n{}",
                s.name,
                frozen.elapsed().as_secs_f64(),
                s.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "{} exited {:.1} s after the freeze: {status}",
            s.name,
            frozen.elapsed().as_secs_f64()
        );
        assert!(!status.success(), "{} exited with {status}", s.name);
        assert!(
            s.output().contains("outage budget"),
            "{} does not say why:\n{}",
            s.name,
            s.output()
        );
    }
    redis.thaw();
    // Restarted by hand here (a supervisor would): they resume from their checkpoints.
    let feedback = start_joiner(&t, &redis, &policy);
    let scorer = start_scorer_on(&t, &redis, &prefix, free_port(), &policy);
    sim.wait_success(Duration::from_secs(120));
    let want = expected(&counts);
    assert_published_exactly_at(&redis.url(), &prefix, &want, &[&feedback, &scorer]);
    scorer.stop();
    feedback.stop();
}
