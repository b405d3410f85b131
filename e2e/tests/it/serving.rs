//! The serving replica against the real broker and Redis (issue 16): the ranking API answers
//! with the serving variant's own prediction, for (ad, context) pairs never seen together and
//! for new ads of known campaigns, equal to what the owners' checkpointed state predicts; a
//! serving-only process and a learner killed mid-stream change nothing of that, and a
//! restarted serving-only process is ready only once it has caught up.

use std::collections::BTreeMap;
use std::time::Duration;

use ctr_e2e::*;
use ctr_models::Impression;
use ctr_schemas::Context;
use ctr_schemas::contract::keys;
use ctr_schemas::partition::partition_of;

const PARTITIONS: i32 = 4;

/// One `GET /v1/ctr` question: ad, campaign given by the request, context fields.
#[derive(Debug, Clone)]
struct Question {
    ad: String,
    campaign: Option<String>,
    fields: BTreeMap<String, String>,
}

impl Question {
    fn context(&self) -> Context {
        Context::from_fields(self.fields.clone()).expect("a valid context")
    }

    fn url(&self, port: u16) -> String {
        let mut q = format!("http://127.0.0.1:{port}/v1/ctr?ad_id={}", self.ad);
        if let Some(c) = &self.campaign {
            q.push_str(&format!("&campaign_id={c}"));
        }
        for (k, v) in &self.fields {
            q.push_str(&format!("&{k}={v}"));
        }
        q
    }
}

/// Known ads in contexts the stream never has (geo JP, device tablet, an extra field), known
/// ads in a context it has, and new ads with and without a campaign.
fn questions() -> Vec<Question> {
    let ctx = |q: &str, g: &str, d: &str, extra: &[(&str, &str)]| {
        let m: BTreeMap<String, String> = [("query_category", q), ("geo", g), ("device", d)]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m
    };
    let contexts = [
        ctx("travel", "JP", "mobile", &[]),
        ctx("shoes", "US", "tablet", &[]),
        ctx("news", "DE", "desktop", &[("hour", "7")]),
        ctx("travel", "US", "mobile", &[]),
    ];
    let mut out = Vec::new();
    for fields in &contexts {
        for (ad, campaign) in [
            ("ad-000", None),
            ("ad-005", None),
            ("ad-050", None),
            ("ad-119", None),
            ("new-ad-1", Some("camp-3")),
            ("new-ad-2", Some("camp-5")),
            ("new-ad-3", None),
        ] {
            out.push(Question {
                ad: ad.into(),
                campaign: campaign.map(String::from),
                fields: fields.clone(),
            });
        }
    }
    out
}

/// What the API on `port` answers: (pctr, source, model_version) per question.
fn answers(port: u16, qs: &[Question]) -> Vec<(f64, String, String)> {
    qs.iter()
        .map(|q| {
            let body = http_get(&q.url(port)).unwrap_or_else(|| panic!("GET {}", q.url(port)));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (
                json_f64(&body, "pctr").unwrap_or_else(|| panic!("{body}")),
                v["source"].as_str().unwrap().to_string(),
                v["model_version"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The serving variant's prediction from the owners' checkpoints, restored here with the
/// scorer's own checkpoint code, for each question (the acceptance's reference), and the
/// source the evidence in that state implies.
fn from_checkpoints(prefix: &str, topic: &str, qs: &[Question]) -> Vec<(f64, &'static str)> {
    let states = checkpointed_states(prefix, topic, PARTITIONS);
    qs.iter()
        .map(|q| {
            let st = &states[partition_of(&q.ad, PARTITIONS as u32) as usize];
            let ctx = q.context();
            let pairs = ctx.pairs();
            let campaign = q
                .campaign
                .as_deref()
                .or(st.campaign_of(&q.ad))
                .unwrap_or("");
            let p = st
                .models()
                .variant("combined")
                .unwrap()
                .predict(&Impression {
                    ad: &q.ad,
                    campaign,
                    position: 1,
                    context: &pairs,
                    ts_ms: 0,
                })
                .p;
            let source = if st.total(&q.ad, Some(&ctx.key())).imps > 0 {
                "exact"
            } else if st.total(&q.ad, None).imps > 0 {
                "backed_off"
            } else {
                "prior"
            };
            (p, source)
        })
        .collect()
}

/// The owners' write fence per partition (-1 before any write).
fn fences(prefix: &str, topic: &str) -> Vec<i64> {
    let mut con = redis();
    (0..PARTITIONS)
        .map(|p| {
            let v: Option<i64> = redis::cmd("GET")
                .arg(keys::offset_fence(prefix, topic, p))
                .query(&mut con)
                .unwrap();
            v.unwrap_or(-1)
        })
        .collect()
}

/// Where each partition's checkpoint resumes.
fn checkpoint_next(prefix: &str, topic: &str) -> Vec<i64> {
    let mut con = redis();
    (0..PARTITIONS)
        .map(|p| {
            let v: Option<i64> = redis::cmd("HGET")
                .arg(keys::scorer_checkpoint(prefix, topic, p))
                .arg("next")
                .query(&mut con)
                .unwrap();
            v.unwrap_or(-1)
        })
        .collect()
}

/// The replica's version per partition as `/readyz` on `port` reports it, when ready.
fn ready_versions(port: u16) -> Option<Vec<i64>> {
    let body = http_get(&format!("http://127.0.0.1:{port}/readyz"))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if v["ready"] != true {
        return None;
    }
    Some(
        v["replica"]["partitions"]
            .as_array()?
            .iter()
            .map(|p| p["version"].as_i64().unwrap_or(-1))
            .collect(),
    )
}

fn start_server(topic: &str, prefix: &str, port: u16) -> Service {
    start_scorer(
        topic,
        &format!("{prefix}unused"),
        prefix,
        port,
        &["--serve-only"],
    )
}

#[test]
fn the_api_serves_the_owners_model_for_unseen_pairs_and_new_ads_through_kills() {
    let topic = format!("{}.labeled", unique("serve"));
    create_topics(&[(&topic, PARTITIONS)]);
    let stream = labeled_stream(&topic, 30_000, 120, 11);
    let prefix = format!("{}:", unique("serve"));
    let group = format!("{topic}-g");
    let fast = ["--checkpoint-ms=500"];
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let doomed = start_scorer(&topic, &group, &prefix, p1, &fast);
    let learner = start_scorer(&topic, &group, &prefix, p2, &fast);
    let server = start_server(&topic, &prefix, p3);
    let page = |port: u16| http_get(&format!("http://127.0.0.1:{port}/metrics"));
    eventually(
        Duration::from_secs(60),
        "both learners to hold partitions",
        || {
            let a = metric(&page(p1)?, "ctr_scorer_assigned_partitions")?;
            let b = metric(&page(p2)?, "ctr_scorer_assigned_partitions")?;
            (a >= 1.0 && b >= 1.0 && a + b == 4.0).then_some(())
        },
        || format!("{}\n{}", doomed.output(), learner.output()),
    );
    eventually(
        Duration::from_secs(30),
        "the serving-only process to be ready",
        || ready_versions(p3),
        || server.output(),
    );
    let third = stream.records.len() / 3;
    produce_all(&stream.records[..third]);
    eventually(
        Duration::from_secs(60),
        "the doomed learner to checkpoint",
        || {
            let p = page(p1)?;
            (metric_sum(&p, "ctr_scorer_checkpoint_seconds_count", "")? > 0.0).then_some(())
        },
        || doomed.output(),
    );
    // A learner and the serving-only process die mid-stream.
    let producing = produce_in_slices(stream.records[third..2 * third].to_vec());
    std::thread::sleep(Duration::from_millis(300));
    doomed.kill9();
    server.kill9();
    producing.join().unwrap();
    // Restarted from nothing, the serving-only process is ready only once it has caught up:
    // its first ready answer reflects at least what the owners had written before it started.
    let before = fences(&prefix, &topic);
    let p4 = free_port();
    let server = start_server(&topic, &prefix, p4);
    let first_ready = eventually(
        Duration::from_secs(60),
        "the restarted serving-only process to be ready",
        || ready_versions(p4),
        || server.output(),
    );
    assert!(
        first_ready.iter().zip(&before).all(|(v, f)| v >= f),
        "ready before catching up: versions {first_ready:?}, owners had {before:?}"
    );
    produce_all(&stream.records[2 * third..]);

    // The survivor owns everything and has checkpointed its final state; every replica
    // reflects the owners' last write.
    eventually(
        Duration::from_secs(120),
        "the stream's totals, a final checkpoint and caught-up replicas",
        || {
            let mut con = redis();
            let counts = published_ad_counts(&mut con, &prefix);
            if counts != stream.expected {
                return None;
            }
            let f = fences(&prefix, &topic);
            let next = checkpoint_next(&prefix, &topic);
            let caught_up = f.iter().zip(&next).all(|(f, n)| *n == f + 1)
                && ready_versions(p2)? == f
                && ready_versions(p4)? == f;
            caught_up.then_some(())
        },
        || format!("{}\n{}", learner.output(), server.output()),
    );
    let qs = questions();
    let want = from_checkpoints(&prefix, &topic, &qs);
    let fence = fences(&prefix, &topic);
    for (who, port) in [("the learner", p2), ("the restarted server", p4)] {
        let got = answers(port, &qs);
        for ((q, (pctr, source, version)), (want, want_source)) in qs.iter().zip(&got).zip(&want) {
            assert_eq!(
                pctr, want,
                "{who}: {q:?} answered {pctr}, the checkpointed model predicts {want}"
            );
            let p = partition_of(&q.ad, PARTITIONS as u32) as usize;
            assert_eq!(*version, format!("combined@{}", fence[p]), "{who}: {q:?}");
            assert_eq!(source, want_source, "{who}: {q:?}");
        }
    }
    // The contexts the stream never had are unseen for every ad, and new ads are new.
    for (q, (_, source)) in qs.iter().zip(&want) {
        if q.ad.starts_with("new") {
            assert_eq!(*source, "prior", "{q:?}");
        } else if q.fields["geo"] == "JP" || q.fields["device"] == "tablet" {
            assert_eq!(*source, "backed_off", "{q:?}");
        }
    }
    // The answers are the model's, not a table's: an ad's unseen contexts get different
    // estimates, and a new ad's campaign moves its estimate.
    let unseen: Vec<f64> = (0..3).map(|c| want[c * 7 + 1].0).collect();
    assert!(
        unseen[0] != unseen[1] && unseen[1] != unseen[2],
        "ad-005 in three unseen contexts: {unseen:?}"
    );
    assert!(
        (0..4).any(|c| want[c * 7 + 4].0 != want[c * 7 + 6].0),
        "a new ad of camp-3 is estimated as one of no campaign"
    );

    // After a clean stop (a final checkpoint of every partition), a serving-only process
    // started from nothing restores exactly that state; the one that followed the learners
    // keeps serving their last model and says how old it is.
    learner.stop();
    let age = |port: u16| -> Option<f64> {
        let body = http_get(&format!("http://127.0.0.1:{port}/readyz"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["ready"] == true).then(|| v["replica"]["age_s"].as_f64())?
    };
    let first = age(p4).expect("still ready, with an age, after the learners stopped");
    std::thread::sleep(Duration::from_millis(1_500));
    let later = age(p4).expect("still ready");
    assert!(
        later >= first + 1.0,
        "the model's age grows: {first} -> {later}"
    );
    let kept: Vec<f64> = answers(p4, &qs).into_iter().map(|a| a.0).collect();
    assert!(
        kept.iter().zip(&want).all(|(k, w)| k == &w.0),
        "the last model keeps serving"
    );
    let p5 = free_port();
    let fresh = start_server(&topic, &prefix, p5);
    eventually(
        Duration::from_secs(60),
        "a fresh serving-only process to be ready",
        || ready_versions(p5),
        || fresh.output(),
    );
    let got: Vec<f64> = answers(p5, &qs).into_iter().map(|a| a.0).collect();
    let want: Vec<f64> = want.into_iter().map(|w| w.0).collect();
    assert_eq!(got, want, "restored from the checkpoints alone");
    fresh.stop();
    server.stop();
}
