//! Reliability (issue #8): poison on every topic, faults, overload.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::{AdShown, Click, Context, Encoder, LabelKind, LabeledImpression, Serve};

use crate::pipeline::{
    assert_published_exactly, expected, feedback, feedback_at, scorer, scorer_at, simulate, topics,
};

fn context() -> Context {
    Context {
        query_category: "q".into(),
        geo: "US".into(),
        device: "mobile".into(),
        extra: Default::default(),
    }
}

/// The four kinds of poison for one topic: garbage bytes, an unknown schema ID, a truncated
/// datum, and valid Avro whose values break the contract; plus a record with no payload.
fn poison_for(valid: Vec<u8>, invalid_values: Vec<u8>) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let truncated = valid[..valid.len() / 2].to_vec();
    vec![
        ("garbage", Some(b"definitely not avro".to_vec())),
        ("unknown schema", Some(vec![0, 0, 0, 0, 99, 1, 2, 3])),
        ("truncated", Some(truncated)),
        ("invalid values", Some(invalid_values)),
        ("no payload", None),
    ]
}

#[test]
fn poison_on_every_topic_is_dead_lettered_with_its_reason_and_nothing_else_is_lost() {
    let t = topics("poison");
    let dir = std::env::temp_dir().join(unique("poison"));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = dir.join("counts.json");

    let serve = Serve {
        serve_id: 77,
        ts_ms: 1_760_000_000_000,
        context: context(),
        ads: vec![AdShown {
            ad_id: "ad-poison".into(),
            campaign_id: "c".into(),
            position: 1,
            bid: 1.0,
        }],
    };
    let mut nan_bid = serve.clone();
    nan_bid.ads[0].bid = f64::NAN;
    let click = Click {
        click_id: 78,
        serve_id: 77,
        ad_id: "ad-poison".into(),
        ts_ms: 1_760_000_000_100,
    };
    let mut no_ad = click.clone();
    no_ad.ad_id = String::new();
    let label = LabeledImpression {
        label_id: "77:ad-poison".into(),
        serve_id: 77,
        ad_id: "ad-poison".into(),
        campaign_id: "c".into(),
        position: 1,
        context: context(),
        clicked: false,
        ts_ms: 1_760_000_000_000,
        click_ts_ms: None,
        kind: LabelKind::Label,
    };
    let mut position_zero = label.clone();
    position_zero.position = 0;
    let (mut se, mut ce, mut le) = (
        Encoder::<Serve>::new(),
        Encoder::<Click>::new(),
        Encoder::<LabeledImpression>::new(),
    );
    let cases = [
        (
            t.serves.clone(),
            poison_for(se.encode(&serve).unwrap(), se.encode(&nan_bid).unwrap()),
        ),
        (
            t.clicks.clone(),
            poison_for(ce.encode(&click).unwrap(), ce.encode(&no_ad).unwrap()),
        ),
        (
            t.labeled.clone(),
            poison_for(
                le.encode(&label).unwrap(),
                le.encode(&position_zero).unwrap(),
            ),
        ),
    ];
    let producer = producer();
    let mut sent = 0;
    for (topic, poison) in &cases {
        for (_, payload) in poison {
            let mut r =
                rdkafka::producer::BaseRecord::<[u8], [u8]>::to(topic).key(b"77".as_slice());
            if let Some(p) = payload {
                r = r.payload(p.as_slice());
            }
            producer
                .send(r)
                .map_err(|(e, _)| e)
                .expect("poison produced");
            sent += 1;
        }
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();

    // The pipeline runs over the poison and real traffic behind it.
    let prefix = format!("{}:", unique("ctr"));
    let port = free_port();
    let feedback = feedback(&t);
    let scorer = scorer(&t, &prefix, port);
    simulate(&t, 3_000, &counts).wait_success(Duration::from_secs(120));
    // Exact per-ad totals: the poison changed nothing, the real events all count.
    let want = expected(&counts);
    assert_published_exactly(&prefix, &want, &[&feedback, &scorer]);

    let dead = read_topic(&t.deadletter);
    let header =
        |r: &Record, name: &str| r.headers.iter().find(|h| h.0 == name).map(|h| h.1.clone());
    let mut by_topic: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &dead {
        let reason = header(r, "ctr.reason").expect("a reason");
        if reason.starts_with("orphan") {
            continue; // the simulator's orphan clicks
        }
        by_topic
            .entry(header(r, "ctr.source_topic").expect("a source topic"))
            .or_default()
            .push(reason);
    }
    for (topic, poison) in &cases {
        let reasons = by_topic.get(topic).cloned().unwrap_or_default();
        assert_eq!(reasons.len(), poison.len(), "{topic}: {reasons:?}");
        assert!(reasons.iter().all(|r| !r.is_empty()), "{reasons:?}");
    }
    // Every service says where each came from, with the same headers (the contract's
    // dead-letter builder): the source partition of every dead letter, and the offset of every
    // poison record (an orphan click is given up on after its window, not read as it is).
    use ctr_schemas::contract::headers as h;
    for r in &dead {
        let orphan = header(r, h::REASON).is_some_and(|r| r.starts_with("orphan"));
        assert!(header(r, h::SOURCE_PARTITION).is_some(), "{r:?}");
        assert_eq!(header(r, h::SOURCE_OFFSET).is_some(), !orphan, "{r:?}");
    }
    // And they are counted.
    let scorer_metrics = http_get(&format!("http://127.0.0.1:{port}/metrics")).unwrap();
    assert_eq!(
        metric_sum(&scorer_metrics, "ctr_scorer_poison_total", ""),
        Some(5.0),
        "{scorer_metrics}"
    );
    assert_eq!(sent, 15);
    scorer.stop();
    feedback.stop();
}

/// Redis AUTH with an ACL user confined to the deployment's key prefixes runs the whole
/// pipeline exactly, a wrong password stops a service with a clear error, and the password
/// never shows: not in logs, metrics, the monitoring view or `--help` (issue #8).
#[test]
fn an_acl_user_runs_the_pipeline_and_its_password_never_shows() {
    let t = topics("acl");
    let prefix = format!("{}:", unique("acl"));
    let user = unique("ctr-acl");
    let password = format!("pw-{}", unique("secret"));
    let mut admin = redis();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("resetkeys")
        .arg(format!("~{prefix}*"))
        .arg(format!("~{}:*", t.serves))
        .arg("resetchannels")
        .arg("+@all")
        .arg("-@dangerous")
        .query(&mut admin)
        .expect("ACL SETUSER");
    let url = redis_url().replacen("redis://", &format!("redis://{user}:{password}@"), 1);

    // A wrong password: a clear error, at once, without the password.
    let wrong = redis_url().replacen("redis://", &format!("redis://{user}:not-{password}@"), 1);
    let bad = scorer_at(&t, &prefix, free_port(), &wrong);
    std::thread::sleep(Duration::from_secs(3));
    let mut bad = bad;
    assert!(!bad.is_running(), "a scorer that cannot authenticate stops");
    let said = bad.output();
    assert!(
        said.to_lowercase().contains("wrongpass") || said.to_lowercase().contains("auth"),
        "{said}"
    );
    assert!(!said.contains(&password), "the password leaked: {said}");

    let dir = std::env::temp_dir().join(unique("acl"));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = dir.join("counts.json");
    let port = free_port();
    let feedback = feedback_at(&t, &url);
    let scorer = scorer_at(&t, &prefix, port, &url);
    simulate(&t, 2_000, &counts).wait_success(Duration::from_secs(120));
    assert_published_exactly(&prefix, &expected(&counts), &[&feedback, &scorer]);

    // Nowhere to be seen.
    std::thread::sleep(Duration::from_secs(3));
    let pages = [
        http_get(&format!("http://127.0.0.1:{port}/metrics")).unwrap(),
        http_get(&format!("http://127.0.0.1:{port}/v1/monitor")).unwrap(),
        http_get(&format!("http://127.0.0.1:{port}/readyz")).unwrap_or_default(),
        scorer.output(),
        feedback.output(),
    ];
    for page in &pages {
        assert!(!page.contains(&password), "the password shows in:\n{page}");
    }
    let help = std::process::Command::new(bin("ctr-scorer"))
        .arg("--help")
        .env("CTR_REDIS_URL", &url)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains(&password));
    scorer.stop();
    feedback.stop();
    let _: redis::RedisResult<()> = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query(&mut admin);
}

/// The ranking API driven far past capacity (issue #8): wrk with 1,024 connections against a
/// scorer that admits one request at a time. The API evaluates its in-memory replica, so a
/// request holds no I/O and the runtime's threads are the capacity: a request that finds the
/// one slot taken (the other thread is in a request) gets `503` at once, everything else is
/// answered, the server answers 99% of requests within the 250 ms deadline, memory stays
/// bounded, nothing else goes wrong, and once the load drops every request is answered again.
/// (Before the replica, a request waited for Redis, and with 16 slots most were shed.)
///
/// The deadline is held on the server's own timing of every answer (`ctr_api_request_seconds`,
/// 503s included), not on wrk's: on two shared cores the loopback under 1,024 connections
/// drops SYNs and retransmits (1 s and 200 ms+ each), and a run in which it loses more than 1%
/// of requests moved the client's p99 past 250 ms with the server no slower (docs/RELIABILITY.md
/// §4). The client's figures and the kernel's TCP counters are printed beside the server's; the
/// client's median must still be far under the deadline, which the kernel's losses cannot move.
#[test]
#[ignore = "load test: it saturates the machine, so it runs alone (scripts/test)"]
fn the_ranking_api_far_past_capacity_sheds_fast_stays_bounded_and_recovers() {
    assert!(
        std::process::Command::new("wrk")
            .arg("--version")
            .output()
            .is_ok(),
        "wrk is needed: scripts/test installs it"
    );
    let prefix = format!("{}:", unique("overload"));
    let topic = format!("{}.labeled", unique("overload"));
    create_topics(&[(&topic, 1)]);
    let port = free_port();
    let scorer = start_scorer(
        &topic,
        &unique("overload-g"),
        &prefix,
        port,
        &["--api-max-concurrency=1"],
    );
    let base = format!("http://127.0.0.1:{port}");
    let body = r#"{"context":{"query_category":"travel","geo":"US","device":"mobile"},"candidates":[{"ad_id":"ad-0001","bid":1.0},{"ad_id":"ad-0002","bid":2.0},{"ad_id":"ad-0003","bid":0.5}],"k":2}"#;
    let one = || http_post_json(&format!("{base}/v1/rank"), body).0;
    eventually(
        Duration::from_secs(30),
        "the API",
        || (one() == 200).then_some(()),
        || scorer.output(),
    );

    let dir = std::env::temp_dir().join(unique("wrk"));
    std::fs::create_dir_all(&dir).unwrap();
    let lua = dir.join("rank.lua");
    std::fs::write(
        &lua,
        format!(
            r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local all = {{}}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do all[k] = (all[k] or 0) + v end
  end
  -- latency[i] counts the requests that took i - 1 microseconds (up to the timeout).
  local slow = 0
  for i = 250001, #latency do slow = slow + latency[i] end
  local parts = {{}}
  for k, v in pairs(all) do table.insert(parts, string.format('"%d":%d', k, v)) end
  io.write(string.format('RESULT {{"statuses":{{%s}},"p50_us":%d,"p99_us":%d,"max_us":%d,"past_250ms":%d,"errors":%d}}\n',
    table.concat(parts, ","), latency:percentile(50), latency:percentile(99), latency.max, slow,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"#
        ),
    )
    .unwrap();
    let rss_before = scorer.rss_bytes().unwrap();
    let tcp_before = tcp_counters();
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c1024", "-d12s", "--timeout", "5s", "-s"])
        .arg(&lua)
        .arg(format!("{base}/v1/rank"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut rss_peak = rss_before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        rss_peak = rss_peak.max(scorer.rss_bytes().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(
        text.lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("no wrk result in:\n{text}")),
    )
    .unwrap();
    let tcp_after = tcp_counters();
    let kernel: Vec<String> = [
        "ListenOverflows",
        "ListenDrops",
        "TCPSynRetrans",
        "TCPTimeouts",
        "TCPLostRetransmit",
    ]
    .iter()
    .map(|name| {
        let delta = |m: &BTreeMap<String, u64>| m.get(*name).copied().unwrap_or(0);
        format!(
            "{name} {}",
            delta(&tcp_after).saturating_sub(delta(&tcp_before))
        )
    })
    .collect();
    // The server's timing of every answer, refusals included (the warm-up requests too).
    let page = http_get(&format!("{base}/metrics")).unwrap();
    let rank = r#"route="rank""#;
    let answered = metric_sum_where(&page, "ctr_api_request_seconds_count", &[rank]).unwrap();
    let within = |le: &str| {
        metric_sum_where(
            &page,
            "ctr_api_request_seconds_bucket",
            &[rank, &format!("le=\"{le}\"")],
        )
        .unwrap_or(0.0)
    };
    let server_p99_bound = ctr_runtime::http::REQUEST_SECONDS_BUCKETS
        .iter()
        .find(|b| within(&b.to_string()) >= 0.99 * answered);
    eprintln!(
        "overload: client (wrk) {result}; server: {answered} answers, {} past 250 ms, p99 at most \
         {server_p99_bound:?} s; kernel: {}; scorer RSS {} MiB before, {} MiB peak",
        answered - within("0.25"),
        kernel.join(", "),
        rss_before >> 20,
        rss_peak >> 20
    );
    let statuses = result["statuses"].as_object().unwrap();
    let (ok, shed) = (
        statuses.get("200").and_then(|v| v.as_u64()).unwrap_or(0),
        statuses.get("503").and_then(|v| v.as_u64()).unwrap_or(0),
    );
    assert!(
        ok > 0 && shed > 0,
        "far past capacity, requests beyond the limit are shed: {statuses:?}"
    );
    assert!(
        statuses.keys().all(|k| k == "200" || k == "503"),
        "nothing but answers and 503s: {statuses:?}"
    );
    assert_eq!(
        result["errors"], 0,
        "no connection, read, write or timeout errors"
    );
    let client_answers: u64 = statuses.values().filter_map(|v| v.as_u64()).sum();
    assert!(
        answered >= client_answers as f64,
        "the server timed every answer the client got: {answered} < {client_answers}"
    );
    assert!(
        answered - within("0.25") <= 0.01 * answered,
        "the server answers 99% of requests (503s included) within the 250 ms deadline: \
         {} of {answered} took longer",
        answered - within("0.25")
    );
    assert!(
        result["p50_us"].as_u64().unwrap() < 250_000,
        "the client's median is far under the deadline: {result}"
    );
    assert!(
        rss_peak < rss_before + (128 << 20),
        "memory bounded under overload: {} -> {} MiB",
        rss_before >> 20,
        rss_peak >> 20
    );
    // Load gone: every request answered again, quickly.
    let t = Instant::now();
    for _ in 0..100 {
        assert_eq!(one(), 200);
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "recovered: {:?} for 100 requests",
        t.elapsed()
    );
    assert!(metric_sum(&page, "ctr_api_rejected_total", "overload").unwrap_or(0.0) > 0.0);
    scorer.stop();
}

/// Redis over TLS (issue #8): with `rediss://` and `--redis-ca-file`, the scorer verifies the
/// server against that CA and works; against another CA it refuses to start, saying why. Uses
/// its own `redis-server` on a TLS-only port with throwaway certificates.
#[test]
fn a_tls_redis_is_verified_against_the_configured_ca() {
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    let tls_port = free_port();
    let mut redis_tls = std::process::Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-port",
            &tls_port.to_string(),
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server starts");
    std::thread::sleep(Duration::from_millis(500));
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let topic = format!("{}.labeled", unique("tls"));
    create_topics(&[(&topic, 1)]);
    let start = |ca: &str, port: u16| {
        Service::start(
            "scorer-tls",
            "ctr-scorer",
            &[
                format!("--brokers={}", brokers()),
                format!("--labeled-topic={topic}"),
                format!("--group={}", unique("tls-g")),
                format!("--redis-url={url}"),
                format!("--redis-ca-file={}", dir.join(ca).display()),
                format!("--redis-prefix={}:", unique("tls")),
                format!("--http-addr=127.0.0.1:{port}"),
            ],
        )
    };
    let mut refused = start("other-ca.crt", free_port());
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !refused.is_running(),
        "a server signed by another CA is refused at start"
    );
    assert!(
        refused.output().to_lowercase().contains("certificate"),
        "{}",
        refused.output()
    );

    let port = free_port();
    let scorer = start("ca.crt", port);
    let body = eventually(
        Duration::from_secs(30),
        "the scorer over TLS",
        || {
            http_get(&format!(
                "http://127.0.0.1:{port}/v1/ctr?ad_id=a&query_category=q&geo=US&device=mobile"
            ))
        },
        || scorer.output(),
    );
    assert!(body.contains("\"source\":\"prior\""), "{body}");
    assert!(http_ok(&format!("http://127.0.0.1:{port}/readyz")));
    scorer.stop();
    let _ = redis_tls.kill();
    let _ = redis_tls.wait();
}

fn http_ok(url: &str) -> bool {
    matches!(ureq::get(url).call(), Ok(r) if r.status() == 200)
}

/// Kafka over SASL_SSL with a wrong password (issue 20): the service stops at start, non-zero,
/// naming the refusal, within seconds (not after the outage budget of "transport failures"),
/// and never prints the password. The right credentials are exercised by the exact pipeline
/// test, which `scripts/test` also runs over SASL_SSL.
#[test]
fn a_wrong_kafka_password_stops_a_service_at_once_naming_the_cause() {
    let env = stack_command(&["env", "sasl"]).output().unwrap();
    if !env.status.success() {
        eprintln!(
            "skipped: the stack's broker has no SASL_SSL listener (Tansu or an external cluster)"
        );
        return;
    }
    let mut cmd = std::process::Command::new(bin("ctr-feedback"));
    for line in String::from_utf8_lossy(&env.stdout).lines() {
        if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
            cmd.env(k, v);
        }
    }
    let password = "n0t-the-Passw0rd";
    let t = topics("saslbad");
    let started = Instant::now();
    let out = cmd
        .env("CTR_KAFKA_SASL_PASSWORD", password)
        .env("RUST_LOG", "info")
        .args([
            &format!("--serves-topic={}", t.serves),
            &format!("--clicks-topic={}", t.clicks),
            "--http-addr=127.0.0.1:0",
            "--outage-budget-ms=60000",
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("the brokers refused the connection") && said.contains("SASL authentication"),
        "{said}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}: {said}");
    assert!(!said.contains(password), "the password leaked: {said}");
}
