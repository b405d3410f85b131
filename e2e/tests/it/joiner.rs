//! The joiner against the real broker and Redis (issue #4): a constructed stream with
//! duplicates, late clicks, orphans, out-of-order events and poison yields exactly the labels
//! its construction implies; SIGKILL at several points changes nothing after dedupe by label ID.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ctr_e2e::*;
use ctr_schemas::{AdShown, Click, Context, Encoder, LabelKind, LabeledImpression, Serve, decode};

const T0: i64 = 1_760_000_000_000;
const WINDOW: i64 = 2_000;
const GRACE: i64 = 500;

/// The stream and what a correct joiner must make of it.
struct Case {
    records: Vec<(String, String, Vec<u8>)>,
    /// label_id → (clicked, kind)
    expected: BTreeMap<String, (bool, LabelKind)>,
    orphans: usize,
    poison: usize,
}

fn build(serves_topic: &str, clicks_topic: &str, n: i64) -> Case {
    let mut se = Encoder::<Serve>::new();
    let mut ce = Encoder::<Click>::new();
    // (ts, order, topic, key, payload): sorted by event time, except out-of-order clicks.
    let mut events: Vec<(i64, i64, String, String, Vec<u8>)> = Vec::new();
    let mut expected = BTreeMap::new();
    let mut orphans = 0;
    let mut click_id = 1;
    let mut click =
        |events: &mut Vec<_>, serve_id: i64, ad: &str, ts: i64, order: i64, id: Option<i64>| {
            let id = id.unwrap_or_else(|| {
                click_id += 1;
                click_id
            });
            let c = Click {
                click_id: id,
                serve_id,
                ad_id: ad.into(),
                ts_ms: ts,
            };
            events.push((
                ts,
                order,
                clicks_topic.to_string(),
                serve_id.to_string(),
                ce.encode(&c).unwrap(),
            ));
            id
        };
    for i in 0..n {
        let serve_id = 1_000_000 + i;
        let ts = T0 + i * 5;
        let ads = [format!("a{}", i % 50), format!("b{}", i % 37)];
        let serve = Serve {
            serve_id,
            ts_ms: ts,
            context: Context {
                query_category: "q".into(),
                geo: "US".into(),
                device: "mobile".into(),
                extra: Default::default(),
            },
            ads: ads
                .iter()
                .enumerate()
                .map(|(k, a)| AdShown {
                    ad_id: a.clone(),
                    campaign_id: "c".into(),
                    position: k as i32 + 1,
                    bid: 1.0,
                })
                .collect(),
        };
        events.push((
            ts,
            0,
            serves_topic.to_string(),
            serve_id.to_string(),
            se.encode(&serve).unwrap(),
        ));
        let mut on_time = [false, false];
        let mut late = [false, false];
        if i % 7 == 0 {
            let id = click(
                &mut events,
                serve_id,
                &ads[0],
                ts + 100 + (i % 13) * 50,
                1,
                None,
            );
            on_time[0] = true;
            if i % 14 == 0 {
                click(
                    &mut events,
                    serve_id,
                    &ads[0],
                    ts + 120 + (i % 13) * 50,
                    1,
                    Some(id),
                ); // same click ID
            }
            if i % 21 == 0 {
                click(&mut events, serve_id, &ads[0], ts + 900, 1, None); // second click, same ad
            }
        }
        if i % 17 == 5 {
            // Out of order: the click is produced before its serve.
            click(&mut events, serve_id, &ads[1], ts + 200, -1, None);
            on_time[1] = true;
        }
        if i % 11 == 3 {
            click(
                &mut events,
                serve_id,
                &ads[1],
                ts + WINDOW + 600 + (i % 5) * 50,
                1,
                None,
            );
            late[1] = true;
        }
        if i % 100 == 50 {
            click(&mut events, 9_000_000_000 + i, "a1", ts + 10, 1, None);
            orphans += 1;
        }
        for k in 0..2 {
            expected.insert(
                LabeledImpression::label_id_for(serve_id, &ads[k]),
                (on_time[k], LabelKind::Label),
            );
            if late[k] && !on_time[k] {
                expected.insert(
                    LabeledImpression::late_click_id_for(serve_id, &ads[k]),
                    (true, LabelKind::LateClick),
                );
            }
        }
    }
    // Sort by event time; an out-of-order click (order −1) sorts before its own serve.
    events.sort_by_key(|e| {
        let anchor = if e.1 == -1 { e.0 - 200 } else { e.0 };
        (anchor, e.1)
    });
    let mut records: Vec<(String, String, Vec<u8>)> =
        events.into_iter().map(|e| (e.2, e.3, e.4)).collect();
    // Poison on both input topics: garbage, an unknown schema ID, a valid serve with a bad value.
    let mut bad_serve = Serve {
        serve_id: 5,
        ts_ms: T0,
        context: Context {
            query_category: "q".into(),
            geo: "US".into(),
            device: "mobile".into(),
            extra: Default::default(),
        },
        ads: vec![AdShown {
            ad_id: "x".into(),
            campaign_id: "c".into(),
            position: 1,
            bid: 1.0,
        }],
    };
    bad_serve.ads[0].bid = f64::NAN;
    let poison = vec![
        (
            serves_topic.to_string(),
            "1".to_string(),
            b"definitely not avro".to_vec(),
        ),
        (
            clicks_topic.to_string(),
            "2".to_string(),
            vec![0, 0, 0, 0, 99, 1, 2, 3],
        ),
        (
            serves_topic.to_string(),
            "5".to_string(),
            se.encode(&bad_serve).unwrap(),
        ),
    ];
    let n_poison = poison.len();
    for (k, p) in poison.into_iter().enumerate() {
        records.insert(100 + k * 500, p);
    }
    Case {
        records,
        expected,
        orphans,
        poison: n_poison,
    }
}

struct Run {
    serves: String,
    clicks: String,
}

fn joiner(run: &Run, labeled: &str, deadletter: &str, group: &str, prefix: &str) -> Service {
    Service::start(
        group,
        "ctr-feedback",
        &[
            format!("--brokers={}", brokers()),
            format!("--serves-topic={}", run.serves),
            format!("--clicks-topic={}", run.clicks),
            format!("--labeled-topic={labeled}"),
            format!("--deadletter-topic={deadletter}"),
            format!("--group={group}"),
            format!("--redis-url={}", redis_url()),
            format!("--redis-prefix={prefix}"),
            format!("--http-addr=127.0.0.1:{}", free_port()),
            format!("--window-ms={WINDOW}"),
            format!("--grace-ms={GRACE}"),
            "--max-out-of-order-ms=300".into(),
            "--idle-ms=2000".into(),
            "--checkpoint-ms=300".into(),
        ],
    )
}

/// label_id → (clicked, kind), asserting that repeated IDs carry identical labels.
fn labels_by_id(topic: &str) -> (BTreeMap<String, (bool, LabelKind)>, usize) {
    let mut out: BTreeMap<String, LabeledImpression> = BTreeMap::new();
    let mut duplicates = 0;
    for r in read_topic(topic) {
        let l: LabeledImpression = decode(&r.payload).expect("labels decode");
        l.validate().expect("labels are valid");
        assert_eq!(r.key, l.ad_id.as_bytes(), "labels are keyed by ad");
        // The headers an overloaded scorer sheds by, before decoding, match the payload.
        let header = |name: &str| r.headers.iter().find(|h| h.0 == name).map(|h| h.1.as_str());
        assert_eq!(
            (header("ctr.clicked"), header("ctr.position")),
            (
                Some(if l.clicked { "1" } else { "0" }),
                Some(l.position.to_string().as_str())
            ),
            "headers of {}",
            l.label_id
        );
        if let Some(prev) = out.get(&l.label_id) {
            assert_eq!(prev, &l, "a re-emitted label must equal the first");
            duplicates += 1;
        } else {
            out.insert(l.label_id.clone(), l);
        }
    }
    (
        out.into_iter()
            .map(|(k, l)| (k, (l.clicked, l.kind)))
            .collect(),
        duplicates,
    )
}

/// Waits until `want` distinct labels are out, or output has not grown for 20 s; the exact
/// comparison afterwards says what is missing or extra.
fn wait_for_labels(topic: &str, want: usize, services: &[&Service]) {
    let (mut last, mut since) = (0, std::time::Instant::now());
    loop {
        let got = labels_by_id(topic).0.len();
        if got >= want {
            return;
        }
        if got != last {
            (last, since) = (got, std::time::Instant::now());
        } else if since.elapsed() > Duration::from_secs(20) {
            for s in services {
                eprintln!("--- {}\n{}", s.name, s.output());
            }
            eprintln!("output stalled at {got} distinct labels of {want}");
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Asserts equal label sets, reporting a short diff (counts and the first few) on failure.
fn assert_same_labels(
    got: &BTreeMap<String, (bool, LabelKind)>,
    want: &BTreeMap<String, (bool, LabelKind)>,
) {
    let missing: Vec<_> = want.iter().filter(|(k, _)| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.iter().filter(|(k, _)| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{} missing (first {:?}), {} unexpected (first {:?}), {} wrong (first {:?})",
        missing.len(),
        &missing[..missing.len().min(6)],
        extra.len(),
        &extra[..extra.len().min(6)],
        wrong.len(),
        &wrong[..wrong.len().min(6)]
    );
}

fn setup(tag: &str, n: i64) -> (Run, Case) {
    let base = unique(tag);
    let run = Run {
        serves: format!("{base}.serves"),
        clicks: format!("{base}.clicks"),
    };
    create_topics(&[(&run.serves, 3), (&run.clicks, 3)]);
    let case = build(&run.serves, &run.clicks, n);
    produce_all(&case.records);
    (run, case)
}

fn outputs(tag: &str) -> (String, String) {
    let base = unique(tag);
    let (labeled, dl) = (format!("{base}.labeled"), format!("{base}.dl"));
    create_topics(&[(&labeled, 3), (&dl, 1)]);
    (labeled, dl)
}

#[test]
fn messy_stream_yields_exactly_the_expected_labels() {
    let (run, case) = setup("messy", 3_000);
    let (labeled, dl) = outputs("messy-out");
    let prefix = format!("{}:", unique("j"));
    let j = joiner(&run, &labeled, &dl, &unique("g"), &prefix);
    wait_for_labels(&labeled, case.expected.len(), &[&j]);
    std::thread::sleep(Duration::from_secs(2));
    j.stop();
    let (got, duplicates) = labels_by_id(&labeled);
    assert_eq!(duplicates, 0, "no restart, so no re-emission");
    assert_same_labels(&got, &case.expected);
    let positives = got
        .values()
        .filter(|v| v.0 && v.1 == LabelKind::Label)
        .count();
    let late = got.values().filter(|v| v.1 == LabelKind::LateClick).count();
    assert!(
        positives > 500 && late > 100,
        "the case exercises both: {positives} positives, {late} late"
    );

    let dead = read_topic(&dl);
    let reason = |r: &Record| {
        r.headers
            .iter()
            .find(|h| h.0 == "ctr.reason")
            .map(|h| h.1.clone())
            .unwrap_or_default()
    };
    let orphans = dead
        .iter()
        .filter(|r| reason(r).starts_with("orphan"))
        .count();
    let poison = dead
        .iter()
        .filter(|r| !reason(r).starts_with("orphan"))
        .count();
    assert_eq!(orphans, case.orphans, "orphans dead-lettered");
    assert_eq!(
        poison,
        case.poison,
        "poison dead-lettered: {:?}",
        dead.iter().map(reason).collect::<BTreeSet<_>>()
    );
    // The signal for the scorer is published.
    let mut con = redis();
    let signal: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(ctr_schemas::contract::keys::joiner_signal(&prefix))
        .query(&mut con)
        .unwrap();
    assert_eq!(signal.len(), 1, "{signal:?}");
    // It reads back as the contract's type, every field present.
    let v: ctr_schemas::contract::JoinerSignal =
        serde_json::from_str(signal.values().next().unwrap()).unwrap();
    assert!(v.click_coverage.unwrap() > 0.5, "{v:?}");
}

#[test]
fn sigkill_at_several_points_changes_no_label() {
    let (run, case) = setup("crash", 12_000);
    let want = case.expected.len();

    // Failure-free reference run.
    let (ref_labeled, ref_dl) = outputs("ref");
    let reference = joiner(
        &run,
        &ref_labeled,
        &ref_dl,
        &unique("ref"),
        &format!("{}:", unique("r")),
    );
    wait_for_labels(&ref_labeled, want, &[&reference]);
    reference.stop();
    let (ref_labels, _) = labels_by_id(&ref_labeled);
    assert_eq!(
        ref_labels, case.expected,
        "the reference run is itself exact"
    );

    // The same input, killed with SIGKILL whenever output passes a threshold, and restarted.
    let (labeled, dl) = outputs("crashed");
    let (group, prefix) = (unique("crash"), format!("{}:", unique("c")));
    let mut kills = 0;
    for fraction in [0.15, 0.4, 0.65, 0.85] {
        let j = joiner(&run, &labeled, &dl, &group, &prefix);
        let threshold = (want as f64 * fraction) as i64;
        eventually(
            Duration::from_secs(120),
            "output to pass the kill threshold",
            || (topic_size(&labeled) >= threshold).then_some(()),
            || j.output(),
        );
        j.kill9();
        kills += 1;
    }
    let j = joiner(&run, &labeled, &dl, &group, &prefix);
    wait_for_labels(&labeled, want, &[&j]);
    std::thread::sleep(Duration::from_secs(2));
    j.stop();
    let (got, duplicates) = labels_by_id(&labeled);
    eprintln!(
        "{kills} SIGKILLs; {duplicates} labels re-emitted with the same ID (dropped by ID downstream)"
    );
    assert_same_labels(&got, &ref_labels);
}
