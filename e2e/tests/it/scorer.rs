//! The scorer against the real broker and Redis (issue #5): SIGKILL of one of two scorers
//! changes no count (also of keys that retire from the hot state and come back), duplicate labels are dropped, load shedding keeps estimates, and the
//! ranking API orders candidates by bid × pCTR.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::LabeledImpression;

fn page(port: u16) -> Option<String> {
    http_get(&format!("http://127.0.0.1:{port}/metrics"))
}

/// Waits until Redis holds exactly `want` under `prefix`, and still does 2 s later.
fn assert_counts(prefix: &str, want: &BTreeMap<String, (u64, u64)>, services: &[&Service]) {
    let mut con = redis();
    let total: u64 = want.values().map(|c| c.0 + c.1).sum();
    let got = eventually(
        Duration::from_secs(120),
        &format!("per-ad totals under {prefix} to reach the stream's"),
        || {
            let now = published_ad_counts(&mut con, prefix);
            (now.values().map(|c| c.0 + c.1).sum::<u64>() >= total).then_some(now)
        },
        || {
            services
                .iter()
                .map(|s| format!("--- {}\n{}", s.name, s.output()))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        got,
        published_ad_counts(&mut con, prefix),
        "totals kept changing"
    );
    assert_eq!(&got, want, "per-ad totals in Redis under {prefix}");
}

#[test]
fn sigkill_of_one_scorer_changes_no_count() {
    let topic = format!("{}.labeled", unique("kill"));
    create_topics(&[(&topic, 4)]);
    let stream = labeled_stream(&topic, 30_000, 120, 7);
    let (chaos, reference) = (
        format!("{}:", unique("chaos")),
        format!("{}:", unique("ref")),
    );
    let group = format!("{topic}-chaos");
    // The stream spans 600 s of event time: with 5 s of hot retention, the rarer (ad, context)
    // keys and ads retire and come back again and again, also across the SIGKILL.
    let fast_ckpt = ["--checkpoint-ms=500", "--totals-hot-ms=5000"];
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let s1 = start_scorer(&topic, &group, &chaos, p1, &fast_ckpt);
    let s2 = start_scorer(&topic, &group, &chaos, p2, &fast_ckpt);
    // A failure-free run over the same topic, for comparison.
    let r = start_scorer(&topic, &format!("{topic}-ref"), &reference, p3, &[]);
    eventually(
        Duration::from_secs(60),
        "both chaos scorers to hold partitions",
        || {
            let a = metric(&page(p1)?, "ctr_scorer_assigned_partitions")?;
            let b = metric(&page(p2)?, "ctr_scorer_assigned_partitions")?;
            (a >= 1.0 && b >= 1.0 && a + b == 4.0).then_some(())
        },
        || format!("{}\n{}", s1.output(), s2.output()),
    );
    let third = stream.records.len() / 3;
    produce_all(&stream.records[..third]);
    eventually(
        Duration::from_secs(60),
        "the doomed scorer to apply and checkpoint records",
        || {
            let p = page(p1)?;
            let applied = metric(&p, "ctr_scorer_applied_total")?;
            let ckpts = metric_sum(&p, "ctr_scorer_checkpoint_seconds_count", "")?;
            (applied > 0.0 && ckpts > 0.0).then_some(())
        },
        || s1.output(),
    );
    // SIGKILL while the second third is being produced.
    let producing = produce_in_slices(stream.records[third..2 * third].to_vec());
    std::thread::sleep(Duration::from_millis(300));
    s1.kill9();
    producing.join().unwrap();
    produce_all(&stream.records[2 * third..]);

    assert_counts(&reference, &stream.expected, &[&r]);
    assert_counts(&chaos, &stream.expected, &[&s2]);
    // Every (ad, context) key too: the same as the failure-free run that never retired any.
    let mut con = redis();
    let contexts = published_context_counts(&mut con, &reference);
    assert!(contexts.len() > 1_000, "{} context keys", contexts.len());
    assert_eq!(
        published_context_counts(&mut con, &chaos),
        contexts,
        "(ad, context) totals with retirement and a SIGKILL"
    );
    let p = page(p2).unwrap();
    let returned = metric_sum(&p, "ctr_scorer_totals_returned_total", "found").unwrap_or(0.0);
    let retired = metric(&p, "ctr_scorer_totals_retired_total").unwrap_or(0.0);
    assert!(
        returned >= 100.0 && retired >= returned,
        "keys retired ({retired}) and came back from Redis ({returned}):\n{}",
        s2.output()
    );
    assert_eq!(
        metric(&p, "ctr_scorer_assigned_partitions"),
        Some(4.0),
        "the survivor owns every partition"
    );
    assert!(
        metric(&p, "ctr_scorer_restores_total").unwrap_or(0.0) >= 1.0,
        "the survivor restored the dead scorer's checkpoints:\n{}",
        s2.output()
    );
    // Its checkpoints were chains: whole states and the increments after them (about 9 per
    // partition by the SIGKILL in every run so far).
    assert!(
        metric(&p, "ctr_scorer_restored_increments_total").unwrap_or(0.0) >= 1.0,
        "the survivor restored checkpoints with increments:\n{}",
        s2.output()
    );
    let duplicates = |port| {
        metric_sum(
            &page(port).unwrap(),
            "ctr_scorer_records_total",
            "duplicate",
        )
    };
    assert!(
        duplicates(p3).unwrap_or(0.0) >= 1_000.0,
        "the re-emitted labels were seen and dropped"
    );
    s2.stop();
    r.stop();
}

/// Two scorers on two simulated hosts (network namespaces, [`NetHost`]); one host's link goes
/// down mid-stream, with no process killed: its broker session lapses, the other host's
/// scorer takes its partitions over from their checkpoints, and the totals end exact. The link
/// then comes back while the cut-off scorer may still hold writes it could not send: the
/// partitions' fences must refuse them.
#[test]
#[ignore = "needs root for `ip netns` and the default stack's loopback ports (scripts/test runs it)"]
fn a_host_cut_off_mid_stream_hands_its_partitions_over_and_totals_end_exact() {
    let topic = format!("{}.labeled", unique("cut"));
    create_topics(&[(&topic, 4)]);
    let stream = labeled_stream(&topic, 30_000, 120, 11);
    let prefix = format!("{}:", unique("cut"));
    let group = format!("{topic}-hosts");
    let (mut a, mut b) = (NetHost::create(1), NetHost::create(2));
    for port in ports_of(&brokers())
        .into_iter()
        .chain(ports_of(&redis_url()))
    {
        a.relay(port);
        b.relay(port);
    }
    let fast_ckpt = ["--checkpoint-ms=500"];
    let (pa, pb) = (free_port(), free_port());
    let page_on =
        |host: &NetHost, port: u16| http_get(&format!("http://{}:{port}/metrics", host.addr));
    let mut sa = start_scorer_on(&a, &topic, &group, &prefix, pa, &fast_ckpt);
    let sb = start_scorer_on(&b, &topic, &group, &prefix, pb, &fast_ckpt);
    eventually(
        Duration::from_secs(60),
        "the scorers on both hosts to hold partitions",
        || {
            let x = metric(&page_on(&a, pa)?, "ctr_scorer_assigned_partitions")?;
            let y = metric(&page_on(&b, pb)?, "ctr_scorer_assigned_partitions")?;
            (x >= 1.0 && y >= 1.0 && x + y == 4.0).then_some(())
        },
        || format!("{}\n{}", sa.output(), sb.output()),
    );
    let third = stream.records.len() / 3;
    produce_all(&stream.records[..third]);
    eventually(
        Duration::from_secs(60),
        "host A's scorer to apply and checkpoint records",
        || {
            let p = page_on(&a, pa)?;
            let applied = metric(&p, "ctr_scorer_applied_total")?;
            let ckpts = metric_sum(&p, "ctr_scorer_checkpoint_seconds_count", "")?;
            (applied > 0.0 && ckpts > 0.0).then_some(())
        },
        || sa.output(),
    );
    // Cut host A off while the second third is being produced.
    let producing = produce_in_slices(stream.records[third..2 * third].to_vec());
    std::thread::sleep(Duration::from_millis(300));
    a.link_down();
    producing.join().unwrap();
    produce_all(&stream.records[2 * third..]);
    eventually(
        Duration::from_secs(60),
        "host B's scorer to take every partition over",
        || {
            let p = page_on(&b, pb)?;
            (metric(&p, "ctr_scorer_assigned_partitions")? == 4.0
                && metric(&p, "ctr_scorer_restores_total")? >= 1.0)
                .then_some(())
        },
        || format!("--- B\n{}\n--- A (cut off)\n{}", sb.output(), sa.output()),
    );
    // B holds everything, A is still cut off: B alone must reach the exact totals.
    assert_counts(&prefix, &stream.expected, &[&sb, &sa]);
    // Heal the link. What A held back is refused by the partitions' fences; A rejoins the
    // group and takes a share of the partitions again, from B's checkpoints.
    a.link_up();
    eventually(
        Duration::from_secs(60),
        "host A's scorer to rejoin and hold partitions again",
        || {
            let x = metric(&page_on(&a, pa)?, "ctr_scorer_assigned_partitions")?;
            let y = metric(&page_on(&b, pb)?, "ctr_scorer_assigned_partitions")?;
            (x >= 1.0 && x + y == 4.0).then_some(())
        },
        || format!("--- A\n{}\n--- B\n{}", sa.output(), sb.output()),
    );
    // Then more traffic, which both hosts learn: the totals end exact again.
    let mut want = stream.expected.clone();
    let mut enc = ctr_schemas::Encoder::<LabeledImpression>::new();
    let more: Vec<(String, String, Vec<u8>)> = (0..2_000i64)
        .map(|i| {
            let (ad, campaign) = (
                format!("ad-{:03}", i % 120),
                format!("camp-{}", i % 120 % 7),
            );
            let clicked = i % 10 == 0;
            let ts = LABELS_T0 + 40_000 * 20 + i * 20;
            let l = single_label(20_000_000 + i, &ad, &campaign, clicked, ts);
            let e = want.entry(ad.clone()).or_default();
            e.0 += 1;
            e.1 += u64::from(clicked);
            (topic.clone(), ad, enc.encode(&l).expect("encodes"))
        })
        .collect();
    produce_all(&more);
    assert_counts(&prefix, &want, &[&sb, &sa]);
    assert!(
        sa.exit_status().is_none(),
        "host A's scorer exited after the link came back:\n{}",
        sa.output()
    );
    sa.stop();
    sb.stop();
}

/// A deployment whose partition keys have the names they had before the key layout's hash
/// tags (`scorer:ckpt:<topic>:<p>`, `offset:...`, `model:...`) is upgraded: the new scorer
/// adopts them (renames them on its single Redis) and resumes where the old one stopped. If it
/// did not, it would find no checkpoint, start empty from the group's committed offsets, and
/// publish only the second half's totals.
#[test]
fn an_upgraded_scorer_adopts_the_untagged_partition_keys_and_stays_exact() {
    if redis_cluster() {
        // A cluster never held the untagged names (the services could not use one before).
        return;
    }
    let topic = format!("{}.labeled", unique("adopt"));
    create_topics(&[(&topic, 2)]);
    let stream = labeled_stream(&topic, 10_000, 60, 13);
    let prefix = format!("{}:", unique("adopt"));
    let group = format!("{topic}-g");
    let half = stream.records.len() / 2;
    produce_all(&stream.records[..half]);
    let port = free_port();
    let old = start_scorer(&topic, &group, &prefix, port, &[]);
    eventually(
        Duration::from_secs(60),
        "the first scorer to apply the first half",
        || {
            let p = page(port)?;
            let seen = metric_sum(&p, "ctr_scorer_records_total", "")?;
            (seen >= half as f64).then_some(())
        },
        || old.output(),
    );
    // Its drain publishes, checkpoints and commits what it applied.
    old.stop();
    let mut con = redis();
    for p in 0..2 {
        let untagged = ctr_schemas::contract::keys::untagged_partition_keys(&prefix, &topic, p);
        let tagged = ctr_schemas::contract::keys::partition_keys(&prefix, &topic, p);
        for (from, to) in tagged.iter().zip(&untagged) {
            let _: () = redis::cmd("RENAME")
                .arg(from)
                .arg(to)
                .query(&mut con)
                .unwrap_or_else(|e| panic!("renaming {from}: {e}"));
        }
    }
    // The estimates too, so that every key below is written again by the new scorer.
    let ad_keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}ad*"))
        .query(&mut con)
        .unwrap();
    for key in ad_keys {
        let _: () = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
    }
    let port = free_port();
    let new = start_scorer(&topic, &group, &prefix, port, &[]);
    produce_all(&stream.records[half..]);
    assert_counts(&prefix, &stream.expected, &[&new]);
    assert!(
        metric(&page(port).unwrap(), "ctr_scorer_restores_total").unwrap_or(0.0) >= 1.0,
        "the new scorer restored the adopted checkpoints:\n{}",
        new.output()
    );
    new.stop();
}

#[test]
fn rank_orders_by_bid_times_pctr_and_rejects_bad_requests() {
    let topic = format!("{}.labeled", unique("rank"));
    create_topics(&[(&topic, 1)]);
    let prefix = format!("{}:", unique("rank"));
    let port = free_port();
    let s = start_scorer(&topic, &format!("{topic}-g"), &prefix, port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let stream = labeled_stream_with(&topic, 4_000, 12, 5, false);
    produce_all(&stream.records);
    // The API answers once its replica reflects the whole partition.
    let last = stream.records.len() as i64 - 1;
    eventually(
        Duration::from_secs(60),
        "the replica to reflect the stream",
        || {
            let body = http_get(&format!("{base}/readyz"))?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["ready"] == true && v["replica"]["partitions"][0]["version"] == last).then_some(())
        },
        || s.output(),
    );
    let ctr = |ad: &str, extra: &str| -> (serde_json::Value, f64) {
        let body = http_get(&format!(
            "{base}/v1/ctr?ad_id={ad}&query_category=travel&geo=US&device=mobile{extra}"
        ))
        .unwrap();
        (
            serde_json::from_str(&body).unwrap(),
            json_f64(&body, "pctr").unwrap(),
        )
    };
    let body = r#"{"context":{"query_category":"travel","geo":"US","device":"mobile"},
        "candidates":[{"ad_id":"ad-001","bid":1.0},{"ad_id":"ad-002","bid":3.0},
                      {"ad_id":"new-ad","bid":4.0,"campaign_id":"camp-3"},{"ad_id":"ad-007","bid":0.3}],"k":3}"#;
    let (status, text) = http_post_json(&format!("{base}/v1/rank"), body);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ranked = v["ranked"].as_array().unwrap();
    assert_eq!(ranked.len(), 3, "k = 3: {text}");
    // Each candidate's pCTR is the model's, as GET /v1/ctr answers it, and the order is by
    // bid × pCTR.
    let mut want: Vec<(String, f64, f64, String)> = [
        ("ad-001", 1.0, ""),
        ("ad-002", 3.0, ""),
        ("new-ad", 4.0, "&campaign_id=camp-3"),
        ("ad-007", 0.3, ""),
    ]
    .iter()
    .map(|(ad, bid, extra)| {
        let (a, pctr) = ctr(ad, extra);
        (
            ad.to_string(),
            pctr,
            bid * pctr,
            a["source"].as_str().unwrap().into(),
        )
    })
    .collect();
    want.sort_by(|a, b| b.2.total_cmp(&a.2));
    let ranked_pctr: Vec<f64> = text
        .split("\"ad_id\"")
        .skip(1)
        .map(|r| json_f64(r, "pctr").unwrap())
        .collect();
    for ((r, (ad, pctr, score, source)), got) in ranked.iter().zip(&want).zip(&ranked_pctr) {
        assert_eq!(r["ad_id"], ad.as_str(), "{text}");
        assert_eq!(got, pctr, "{text}");
        assert!(
            (r["score"].as_f64().unwrap() - score).abs() < 1e-15,
            "{text}"
        );
        assert_eq!(r["source"], source.as_str(), "{text}");
        assert_eq!(
            r["model_version"],
            format!("combined@{last}").as_str(),
            "{text}"
        );
    }
    assert_eq!(ctr("ad-001", "").0["source"], "exact");
    assert_eq!(ctr("new-ad", "&campaign_id=camp-3").0["source"], "prior");
    let busy = ctr("ad-001", "").1;
    assert!(busy > 0.0 && busy < 0.2, "a sane estimate: {busy}");

    let bad = [
        (r#"{"context":{"query_category":"travel","geo":"US","device":"mobile"},"candidates":[{"ad_id":"a1"}]}"#.to_string(), "candidates[0]"),
        (r#"{"context":{"geo":"US","device":"mobile"},"candidates":[{"ad_id":"a1","bid":1}]}"#.to_string(), "context.query_category"),
        ("not json".to_string(), "invalid JSON"),
        (r#"{"context":{"query_category":"travel","geo":"US","device":"mobile"},"candidates":[{"ad_id":"a1","bid":-2}]}"#.to_string(), "candidates[0].bid"),
    ];
    for (body, names) in bad {
        let (status, text) = http_post_json(&format!("{base}/v1/rank"), &body);
        assert_eq!(status, 400, "{body} -> {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON error body");
        assert!(
            v["error"].as_str().unwrap().contains(names),
            "{body} -> {text}"
        );
    }
    let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2 << 20));
    let addr = base.trim_start_matches("http://");
    assert_eq!(
        http_post_oversized(addr, "/v1/rank", &[], huge.into_bytes()),
        413
    );
    let doc = http_get(&format!("{base}/openapi.json")).expect("OpenAPI document");
    assert!(doc.contains("/v1/rank") && doc.contains("RankRequest"));
    s.stop();
}

/// Starts a scorer with one worker, tuned for freshness (a Redis write every 5 records), and
/// waits for its 4 partitions. Its capacity is low enough that this two-core machine, which
/// also runs the broker and the load generator, can feed it five times as much (with a write
/// every 25 records it reached 57k labels/s once the models got faster, and five times that is
/// beyond what the machine can produce and drop).
fn single_worker_scorer(topic: &str, tag: &str, extra: &[&str]) -> (Service, u16, String) {
    let port = free_port();
    let prefix = format!("{}:", unique(tag));
    let mut args = vec!["--workers=1", "--batch-size=5"];
    args.extend_from_slice(extra);
    let s = start_scorer(topic, &format!("{prefix}g"), &prefix, port, &args);
    eventually(
        Duration::from_secs(60),
        "the scorer to own all partitions",
        || metric(&page(port)?, "ctr_scorer_assigned_partitions").filter(|v| *v >= 4.0),
        || s.output(),
    );
    (s, port, prefix)
}

/// The serving variant's prediction at the top slot for each label's ad and context, from the
/// partition checkpoints under `prefix` (restored with the scorer's own code).
fn checkpointed<'a>(
    prefix: &str,
    topic: &str,
    labels: impl Iterator<Item = &'a LabeledImpression>,
) -> Vec<f64> {
    let states = checkpointed_states(prefix, topic, 4);
    labels
        .map(|l| {
            let st = &states[ctr_schemas::partition::partition_of(&l.ad_id, 4) as usize];
            let pairs = l.context.pairs();
            st.models()
                .variant("combined")
                .unwrap()
                .predict(&ctr_models::Impression {
                    ad: &l.ad_id,
                    campaign: &l.campaign_id,
                    position: 1,
                    context: &pairs,
                    ts_ms: 0,
                })
                .p
        })
        .collect()
}

/// Per-ad published pCTR under `prefix`.
fn published_pctr(prefix: &str) -> BTreeMap<String, f64> {
    published(prefix, "ad:")
}

/// The pCTR of every key under `prefix` + `kind` (`ad:` or `adctx:`), by the rest of its key.
fn published(prefix: &str, kind: &str) -> BTreeMap<String, f64> {
    let mut con = redis();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}{kind}*"))
        .query(&mut con)
        .unwrap();
    keys.into_iter()
        .map(|key| {
            let p: f64 = redis::cmd("HGET")
                .arg(&key)
                .arg("pctr")
                .query(&mut con)
                .unwrap();
            // An ad key by its ad; any other by the rest of its key.
            let name = ctr_schemas::contract::keys::ad_of_key(prefix, &key)
                .unwrap_or(&key[prefix.len() + kind.len()..])
                .to_string();
            (name, p)
        })
        .collect()
}

#[test]
#[ignore = "load test: it measures capacity, so it runs alone (scripts/test runs it after the others)"]
fn shedding_at_five_times_capacity_bounds_lag_and_memory_and_keeps_estimates() {
    // 1. Capacity without shedding: one worker over a backlog.
    let calib = format!("{}.labeled", unique("calib"));
    create_topics(&[(&calib, 4)]);
    let c = labeled_stream(&calib, 150_000, 60, 3);
    c.produce(None, |_| {});
    let n = c.records.len() as f64;
    let (s, port, _) = single_worker_scorer(&calib, "calib", &["--shedding=false"]);
    let t = Instant::now();
    eventually(
        Duration::from_secs(300),
        "the calibration backlog",
        || (scorer_records(port).unwrap_or(0.0) >= n).then_some(()),
        || s.output(),
    );
    let capacity = n / t.elapsed().as_secs_f64();
    s.stop();

    // 2. Input at (up to) five times that for 8 s of load, into a shedding scorer.
    let topic = format!("{}.labeled", unique("shed"));
    create_topics(&[(&topic, 4)]);
    let rate = 5.0 * capacity;
    // No re-emitted duplicates here: records dropped unread by stage-two shedding escape
    // dedupe (documented in `ctr_scorer::load`); dedupe is tested with SIGKILL above.
    let stream = std::sync::Arc::new(labeled_stream_with(
        &topic,
        (rate * 8.0) as usize,
        60,
        11,
        false,
    ));
    let total = stream.records.len() as f64;
    let (s, port, shed_prefix) = single_worker_scorer(
        &topic,
        "shed",
        &["--queue-capacity=5000", "--lag-bound=20000"],
    );
    let produced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let (stream, produced) = (
            std::sync::Arc::clone(&stream),
            std::sync::Arc::clone(&produced),
        );
        std::thread::spawn(move || {
            let start = Instant::now();
            stream.produce(Some(rate), |n| {
                produced.store(n, std::sync::atomic::Ordering::Relaxed)
            });
            start.elapsed()
        })
    };
    let mut lags = Vec::new();
    let mut governed = Vec::new();
    let rss_before = s.rss_bytes().unwrap_or(0);
    let mut rss_peak = rss_before;
    while !producer.is_finished() {
        std::thread::sleep(Duration::from_millis(500));
        let done = scorer_records(port).unwrap_or(0.0);
        lags.push(produced.load(std::sync::atomic::Ordering::Relaxed) as f64 - done);
        // What the governor was doing then: keep-rate of negatives × stage-two thinning.
        if let Some(p) = page(port) {
            governed.push((
                metric(&p, "ctr_scorer_negative_keep_rate").unwrap_or(f64::NAN),
                metric(&p, "ctr_scorer_thinning_factor").unwrap_or(f64::NAN),
            ));
        }
        rss_peak = rss_peak.max(s.rss_bytes().unwrap_or(0));
    }
    let took = producer.join().unwrap().as_secs_f64();
    let achieved = total / took;
    eventually(
        Duration::from_secs(300),
        "the shedding scorer to take every record",
        || (scorer_records(port).unwrap_or(0.0) >= total).then_some(()),
        || s.output(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let p = page(port).unwrap();
    let shed = metric_sum(&p, "ctr_scorer_records_total", "shed").unwrap_or(0.0)
        + metric_sum(&p, "ctr_scorer_records_total", "dropped").unwrap_or(0.0);
    // A restore mid-run (a rebalance) or a paused learner would change what the estimates
    // below mean; printed so that a failure says whether either happened.
    let restores = metric(&p, "ctr_scorer_restores_total").unwrap_or(0.0);
    let guarded = metric_sum(&p, "ctr_scorer_records_total", "guarded").unwrap_or(0.0);
    // It keeps running: its ranking API is asked at the end, beside the reference's.
    let (shed_scorer, shed_port) = (s, port);
    eprintln!(
        "capacity {capacity:.0}/s; input {achieved:.0}/s for {took:.1} s; shed {shed:.0}; lag samples {lags:?}; (keep-rate, thinning) samples {governed:?}; restores {restores}, guarded {guarded}; scorer RSS {} MiB before, {} MiB peak",
        rss_before >> 20,
        rss_peak >> 20
    );
    // The load aims at 5x; the producer shares the machine and may fall a little short.
    assert!(
        achieved >= 4.0 * capacity,
        "the test could not overload the scorer ({achieved:.0}/s vs capacity {capacity:.0}/s)"
    );
    // Memory: the queues are bounded and shed records are not kept, so overload does not grow
    // the scorer beyond what its models and its bounded queues hold.
    assert!(
        rss_peak < rss_before + (256 << 20),
        "the scorer grew from {} to {} MiB under overload",
        rss_before >> 20,
        rss_peak >> 20
    );
    assert!(shed > 0.1 * total, "shedding engaged: {shed} of {total}");
    let peak = lags.iter().copied().fold(0.0, f64::max);
    let last = lags.last().copied().unwrap_or(0.0);
    let unshed_growth = (achieved - capacity) * took;
    assert!(
        peak <= 0.5 * unshed_growth && last < peak,
        "lag bounded and falling while overloaded: peak {peak:.0}, at the end {last:.0}; without shedding it would reach {unshed_growth:.0}"
    );

    // Shedding keeps the totals exact: clicks are never shed, and an ad's impressions miss
    // at most its unfinished stage-two groups (one per position, 4 here, each fewer than the
    // largest thinning factor, 10).
    let mut con = redis();
    for (ad, (imps, clicks)) in &stream.expected {
        let (got_imps, got_clicks): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(ctr_schemas::contract::keys::ad(&shed_prefix, ad))
            .arg("imps")
            .arg("clicks")
            .query(&mut con)
            .unwrap();
        let (got_imps, got_clicks) = (got_imps.unwrap_or(0), got_clicks.unwrap_or(0));
        assert!(
            got_clicks == *clicks && got_imps <= *imps && got_imps + 4 * 9 >= *imps,
            "{ad}: totals under shedding {got_imps} impressions, {got_clicks} clicks; the stream has {imps}, {clicks} (restores {restores})"
        );
    }

    // 3. The same stream without shedding, as the reference estimates.
    let (s, port, ref_prefix) = single_worker_scorer(&topic, "ref", &["--shedding=false"]);
    eventually(
        Duration::from_secs(300),
        "the reference scorer",
        || (scorer_records(port).unwrap_or(0.0) >= total).then_some(()),
        || s.output(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (shed_p, ref_p) = (published_pctr(&shed_prefix), published_pctr(&ref_prefix));
    // Shedding keeps estimates unbiased, not exact. A kept negative stands for dropped ones of
    // its ad *and position* (both stages group so), so the ad level's examination units are
    // exact but for each group's unfinished tail, which raises an ad's estimate a little
    // (fewer than 10 negatives per position not counted yet). Measured at the heaviest
    // shedding this run reaches (a fifth kept, K = 10; `shedding_noise` example, 16 seeds,
    // and four runs of this test): each ad's error is ~0.21-0.26 / sqrt(n) including that
    // tail, and their mean is +0.17% offline, +0.23 to +0.32% here, with sd 0.03%. So the
    // mean within 0.75%, and every ad within four times 0.3 / sqrt(n), at least 1.5%.
    // (Grouped by ad alone, a kept negative at the top stood for negatives of every slot: each
    // ad then scattered by 1.1-2.8 / sqrt(n), the mean by 0.4% offline and up to 1.7% here, and
    // a 1.5% bound on the mean failed CI.)
    let rel: Vec<(&String, u64, f64)> = stream
        .expected
        .iter()
        .filter(|(_, (imps, _))| *imps >= 1_000)
        .map(|(ad, (imps, _))| (ad, *imps, shed_p[ad] / ref_p[ad] - 1.0))
        .collect();
    eprintln!(
        "shed/unshed pCTR: {:?}",
        rel.iter()
            .map(|(ad, n, r)| format!("{ad}:{n}:{r:+.3}"))
            .collect::<Vec<_>>()
    );
    let checked = rel.len();
    let mean = rel.iter().map(|r| r.2).sum::<f64>() / checked.max(1) as f64;
    assert!(
        mean.abs() <= 0.0075,
        "biased by shedding: mean relative error {mean:+.4}"
    );
    for (ad, imps, r) in &rel {
        let bound = (4.0 * 0.3 / (*imps as f64).sqrt()).max(0.015);
        assert!(
            r.abs() <= bound,
            "{ad} ({imps} impressions): pCTR {:.5} with shedding vs {:.5} without ({r:+.3}, bound {bound:.3})",
            shed_p[*ad],
            ref_p[*ad]
        );
    }
    assert!(checked >= 20, "only {checked} ads with 1,000+ impressions");
    // What the serving variant (combined) predicts in each context, at the same record of
    // the stream in both runs (a key is written at its impressions).
    let (shed_c, ref_c) = (
        published(&shed_prefix, "adctx:"),
        published(&ref_prefix, "adctx:"),
    );
    let rel_c: Vec<f64> = ref_c
        .iter()
        .filter_map(|(k, r)| Some(shed_c.get(k)? / r - 1.0))
        .collect();
    let mean_c = rel_c.iter().sum::<f64>() / rel_c.len().max(1) as f64;
    let mut sorted = rel_c.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "shed/unshed pCTR per (ad, context), {} keys: mean {mean_c:+.4}, p5 {:+.3}, p50 {:+.3}, p95 {:+.3}",
        rel_c.len(),
        sorted[sorted.len() / 20],
        sorted[sorted.len() / 2],
        sorted[sorted.len() * 19 / 20]
    );
    // Each key's estimate scatters by ~9% (few impressions per ad and context; measured p5
    // -14%, p95 +15%), so the mean of the ratios carries Jensen's +0.5%; bias is judged on the
    // ratio of the sums, as calibration is. That sum does not average its keys' noise away:
    // the keys of a partition share FTRL's bias, position and count-feature weights, which
    // take big importance-weighted steps under shedding. The statistic's noise, from the
    // test's stream replayed through the scorer's partition state with both shedding stages
    // (`cargo run --release -p ctr-e2e --example shedding_noise -- SEEDS 0.2 K`), keeping a
    // fifth of the negatives and thinning by K, 16 seeds each, negatives grouped by ad and
    // position:
    //   K = 2 (10% kept): mean -0.30% (standard error 0.08%), sd 0.34%;
    //   K = 4 (5% kept):  mean -0.61% (0.16%), sd 0.63%;
    //   K = 10 (2% kept): mean -1.64% (0.26%), sd 1.05%.
    // These are low because each is written right after its key's last learned record, more
    // often a heavy negative under shedding (the final state asked at the end is not: below;
    // docs/RELIABILITY.md §4). This run, whose governor reaches K = 10, is bounded by that
    // level's bias plus four of its sigmas (8.0% while negatives were grouped by ad alone: sd
    // 1.47%). A bound of 1.5% (two sigmas then) failed CI once at -1.7%. The +8% that the ad
    // key once showed under shedding (FTRL asked with no context fields) fails it, and
    // `ctr-models`' weighted-sampling test guards the learners without this noise.
    let (sum_shed, sum_ref) = ref_c
        .iter()
        .filter_map(|(k, r)| Some((shed_c.get(k)?, r)))
        .fold((0.0, 0.0), |(a, b), (s, r)| (a + s, b + r));
    let aggregate = sum_shed / sum_ref - 1.0;
    eprintln!("shed/unshed sum of per-(ad, context) pCTR: {aggregate:+.4}");
    assert!(rel_c.len() >= 500, "only {} context keys", rel_c.len());
    assert!(
        aggregate.abs() <= 0.0164 + 4.0 * 0.0105,
        "the serving variant biased by shedding: its per-context estimates sum {aggregate:+.4} off"
    );

    // What the ranking API answers for every (ad, context) of the stream, from each run's final
    // state. Redis holds each key's estimate as of its last impression, and under shedding that
    // impression is more often a negative standing for many, learned just before the write:
    // hence the -1.6% above. The API evaluates the model when asked, as the frontend gets it.
    // The `shedding_noise` example reads it so (16 seeds each): K = 2: mean -0.12% (standard
    // error 0.06%), sd 0.24%; K = 4: 0.00% (0.10%), sd 0.39%; K = 10: -0.26% (0.11%), sd 0.45%.
    // This test's runs scatter more (-0.2% to -2.4% over eight runs of its one stream, whose
    // replay gives -0.3%: the governor's schedule moves where the groups fall; the -2.4% is
    // not explained, docs/RELIABILITY.md §4), so the bound is the written estimates' one. The
    // exact property is the other: every answer is what the owners' final checkpoint predicts.
    let settled = |port: u16| {
        let body = http_get(&format!("http://127.0.0.1:{port}/readyz"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["ready"] == true && v["replica"]["lag"] == 0).then_some(())
    };
    eventually(
        Duration::from_secs(60),
        "both replicas to reflect their owners",
        || settled(shed_port).and(settled(port)),
        || format!("{}\n{}", shed_scorer.output(), s.output()),
    );
    let mut asked: BTreeMap<(String, String), LabeledImpression> = BTreeMap::new();
    for (_, _, bytes) in &stream.records {
        let l: LabeledImpression = ctr_schemas::wire::decode(bytes).unwrap();
        asked.insert((l.ad_id.clone(), l.context.key()), l);
    }
    let served = |port: u16, l: &LabeledImpression| {
        let c = &l.context;
        let body = http_get(&format!(
            "http://127.0.0.1:{port}/v1/ctr?ad_id={}&query_category={}&geo={}&device={}",
            l.ad_id, c.query_category, c.geo, c.device
        ))
        .expect("GET /v1/ctr");
        json_f64(&body, "pctr").expect("a pctr")
    };
    let shed_api: Vec<f64> = asked.values().map(|l| served(shed_port, l)).collect();
    let ref_api: Vec<f64> = asked.values().map(|l| served(port, l)).collect();
    let api = shed_api.iter().sum::<f64>() / ref_api.iter().sum::<f64>() - 1.0;
    s.stop();
    shed_scorer.stop();
    // After a clean stop each owner has checkpointed its final state: the API must have
    // answered what that state predicts.
    let shed_ckpt = checkpointed(&shed_prefix, &topic, asked.values());
    let ref_ckpt = checkpointed(&ref_prefix, &topic, asked.values());
    let worst = |api: &[f64], ckpt: &[f64]| {
        api.iter()
            .zip(ckpt)
            .map(|(a, c)| (a / c - 1.0).abs())
            .fold(0.0, f64::max)
    };
    let (worst_shed, worst_ref) = (worst(&shed_api, &shed_ckpt), worst(&ref_api, &ref_ckpt));
    eprintln!(
        "shed/unshed sum of the API's pCTR over {} (ad, context) keys: {api:+.4}; from the checkpoints {:+.4}; API vs checkpoint, largest relative difference: shed {worst_shed:.2e}, unshed {worst_ref:.2e}",
        asked.len(),
        shed_ckpt.iter().sum::<f64>() / ref_ckpt.iter().sum::<f64>() - 1.0,
    );
    assert!(
        worst_shed <= 1e-9 && worst_ref <= 1e-9,
        "the API answers what the owners' final state predicts, shed or not"
    );
    assert!(
        api.abs() <= 0.0164 + 4.0 * 0.0105,
        "the served model biased by shedding: the API's estimates sum {api:+.4} off"
    );
}

#[test]
fn a_stalled_click_stream_pauses_learning_not_counting() {
    let topic = format!("{}.labeled", unique("guard"));
    create_topics(&[(&topic, 2)]);
    let prefix = format!("{}:", unique("guard"));
    let mut con = redis();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // What a joiner publishes when clicks stop arriving (ctr-feedback's `signals`), through
    // the contract's own type.
    let signal = serde_json::to_string(&ctr_schemas::contract::JoinerSignal {
        stalled: true,
        reason: Some("no clicks in the last 60 s while 900 serves arrived".into()),
        click_coverage: Some(0.0),
        window_serves: 900,
        window_clicks: 0,
        clicks_per_serve: Some(0.0),
        baseline_clicks_per_serve: Some(0.02),
        updated_ms: now_ms,
        totals: ctr_schemas::contract::JoinStats::default(),
    })
    .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(ctr_schemas::contract::keys::joiner_signal(&prefix))
        .arg("joiner-1")
        .arg(&signal)
        .query(&mut con)
        .unwrap();
    let port = free_port();
    let s = start_scorer(&topic, &format!("{topic}-g"), &prefix, port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        Duration::from_secs(30),
        "the guard to pause learning",
        || http_get(&format!("{base}/readyz")).filter(|b| b.contains("\"learning\":false")),
        || s.output(),
    );
    let stream = labeled_stream_with(&topic, 2_000, 10, 5, false);
    stream.produce(None, |_| {});
    assert_counts(&prefix, &stream.expected, &[&s]);
    let p = page(port).unwrap();
    let guarded = metric_sum(&p, "ctr_scorer_records_total", "guarded").unwrap_or(0.0);
    let learned = metric_sum(&p, "ctr_scorer_records_total", "learned").unwrap_or(0.0);
    assert_eq!(learned, 0.0, "nothing learned while stalled");
    let duplicates = metric_sum(&p, "ctr_scorer_records_total", "duplicate").unwrap_or(0.0);
    assert_eq!(
        (guarded + duplicates) as usize,
        stream.records.len(),
        "every record counted: guarded, or a repeated late click"
    );
    assert_eq!(metric(&p, "ctr_scorer_learning_paused"), Some(1.0));
    assert!(s.output().contains("learning paused"), "{}", s.output());
    s.stop();
}
