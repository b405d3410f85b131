//! The ranking API answered from the model replica (issue 16): `POST /v1/rank` throughput
//! against the same process's `/healthz` in the same run (five rounds of the two back to back,
//! and their medians: [`ROUNDS`]), latency at half that load, and freshness through the API
//! (a label produced → the API's answer reflects it).
//!
//! Run (stack up, release binaries built: `cargo build --release --workspace --bins`):
//! `cargo bench -p ctr-e2e --bench rank_api` (needs wrk: `apt-get install wrk`).
//!
//! The model: 200,000 labels over 500 ads on 4 partitions, learned by a `ctr-scorer` with its
//! defaults (counts, FTRL and combined; combined serves). The load: wrk on loopback, sharing
//! the two cores with the server, the broker and Redis; each `/v1/rank` request has 10
//! candidates drawn from 600 ads (100 of them never seen, half of those with a campaign) in a
//! context drawn from 30 query categories × 12 geos × 3 devices × 24 hours (the model's
//! traffic had 3 × 3 × 2 contexts: nearly every request is a context the model never saw);
//! each wrk thread makes 4,096 such requests at its start and cycles through them (the
//! server keeps no answer between requests, so a repeated body costs it the same).
//!
//! Last, a `--serve-only` process over the same learners' state (the shape of a fleet of API
//! processes): its memory, and the same throughput figures against its own `/healthz`.

use std::process::Command;
use std::time::{Duration, Instant};

use ctr_e2e::*;
use ctr_schemas::{Encoder, LabeledImpression};

const RANK_LUA: &str = r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local cats, geos, devices = 30, 12, {"mobile", "desktop", "tablet"}
-- 4,096 distinct requests, made once per thread: building a body per request in Lua costs
-- wrk more CPU than the server's answer, on the two cores they share.
local bodies, next_body = {}, 0
local function make()
  local c, seen = {}, {}
  for i = 1, 10 do
    local n = math.random(0, 599)
    -- Distinct candidates: a request naming an ad twice is a 400.
    while seen[n] do n = math.random(0, 599) end
    seen[n] = true
    if n < 500 then
      c[#c + 1] = string.format('{"ad_id":"ad-%03d","bid":%d.5}', n, i % 4 + 1)
    elseif n < 550 then
      c[#c + 1] = string.format('{"ad_id":"new-%03d","bid":1.5,"campaign_id":"camp-%d"}', n, n % 7)
    else
      c[#c + 1] = string.format('{"ad_id":"new-%03d","bid":1.5}', n)
    end
  end
  local ctx = string.format('{"query_category":"q%d","geo":"g%d","device":"%s","hour":"%d"}',
    math.random(1, cats), math.random(1, geos), devices[math.random(1, 3)], math.random(0, 23))
  return wrk.format(nil, nil, nil, '{"context":' .. ctx .. ',"candidates":[' .. table.concat(c, ",") .. '],"k":3}')
end
function init(args)
  math.randomseed(7 + math.floor(os.clock() * 1e6))
  for i = 1, 4096 do bodies[i] = make() end
end
request = function()
  next_body = next_body % #bodies + 1
  return bodies[next_body]
end
"#;

/// The same client work per request as `RANK_LUA` (a Lua `request()` returning a prebuilt
/// request), asking `/healthz`: wrk's own cost per request then matches between the two
/// endpoints, on the cores it shares with the server.
const HEALTH_LUA: &str = r#"
local req
function init(args) req = wrk.format("GET", "/healthz") end
request = function() return req end
"#;

/// wrk's summary of one run.
struct Run {
    /// Requests per second.
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    non2xx: u64,
    /// The server's CPU time per answered request (user + system, µs).
    server_cpu_us: f64,
}

/// Runs wrk for 10 s against `url` (with a Lua `script`, if any), and reads the server's CPU
/// time before and after.
fn wrk(server: &Service, url: &str, connections: u32, script: Option<&std::path::Path>) -> Run {
    wrk_for(10, server, url, connections, script)
}

/// [`wrk`] for `seconds`.
fn wrk_for(
    seconds: u32,
    server: &Service,
    url: &str,
    connections: u32,
    script: Option<&std::path::Path>,
) -> Run {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let cpu_before = server.cpu_seconds().expect("the server's /proc/PID/stat");
    let out = cmd.arg(url).output().expect("wrk (apt-get install wrk)");
    let cpu = server.cpu_seconds().expect("the server's /proc/PID/stat") - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
            .unwrap_or_else(|| panic!("no `{prefix}` in wrk's output:\n{text}"))
    };
    let ms = |v: String| -> f64 {
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().unwrap() / 1e3
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().unwrap()
        } else {
            v.trim_end_matches('s').parse::<f64>().unwrap() * 1e3
        }
    };
    let non2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    // "123456 requests in 10.00s, 12.34MB read"
    let requests: f64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.to_string())
        })
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"))
        .parse()
        .unwrap();
    Run {
        rate: field("Requests/sec:").parse().unwrap(),
        p50_ms: ms(field("50%")),
        p99_ms: ms(field("99%")),
        non2xx,
        server_cpu_us: cpu * 1e6 / requests.max(1.0),
    }
}

/// Produces one label at a time (a negative: learned at once; or a click: counted at once,
/// learned once the negatives of its time arrive) at a steady background load, and measures
/// from the send until the API's answer for its ad and context reflects it: its exact
/// `impressions` (a negative: the same replica update carries the pCTR it moved) or `clicks`
/// (a click) move. Only this label moves them; background traffic moves shared parameters.
fn freshness(topic: &str, port: u16, clicks: bool) -> (Vec<f64>, Vec<f64>) {
    let bg = Background::start(topic, 300, false);
    let mut enc = Encoder::<LabeledImpression>::new();
    let producer = producer();
    let (mut delays, mut acks) = (Vec::new(), Vec::new());
    let base = if clicks { 0 } else { 1_000 };
    for i in 0..200i64 {
        let ad = format!("fresh-{}", i % 8);
        let url = format!(
            "http://127.0.0.1:{port}/v1/ctr?ad_id={ad}&query_category=travel&geo=US&device=mobile"
        );
        let read = || {
            let body = http_get(&url).expect("GET /v1/ctr");
            let field = if clicks { "clicks" } else { "impressions" };
            json_f64(&body, field).expect("a number")
        };
        let before = read();
        let ts = LABELS_T0 + 10_000_000 + (base + i) * 1_000;
        let l = single_label(95_000_000 + base + i, &ad, "camp-1", clicks, ts);
        let payload = enc.encode(&l).unwrap();
        let started = Instant::now();
        acks.push(send_acked(&producer, topic, &ad, &payload));
        while read() == before {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the API never reflected label {i}"
            );
            std::thread::sleep(Duration::from_micros(300));
        }
        delays.push(started.elapsed().as_secs_f64() * 1e3);
    }
    bg.stop();
    delays.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    (delays, acks)
}

/// Rounds of [`throughput`]: the shared machine's speed moves from one 10-second run to the
/// next by as much as ±20% (docs/BENCHMARKS.md), so a ratio of two runs taken 20 s apart
/// carries that noise. Short runs of the two endpoints back to back, repeated, and the median
/// of the rounds' ratios measure the ratio itself.
const ROUNDS: usize = 5;
/// Seconds of each wrk run in a round.
const ROUND_SECONDS: u32 = 4;

/// [`ROUNDS`] rounds, each `/healthz` (plain and through wrk's Lua `request()`) and then
/// `/v1/rank` of process `s` (`who`, answering at `base`) at `connections` for
/// [`ROUND_SECONDS`] each; prints each round's rates, the server's CPU per request and the
/// ratios, then their medians.
fn throughput(
    who: &str,
    s: &Service,
    base: &str,
    connections: u32,
    rank_lua: &std::path::Path,
    health_lua: &std::path::Path,
) {
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        let run = |url: &str, script| wrk_for(ROUND_SECONDS, s, url, connections, script);
        let health = run(&format!("{base}/healthz"), None);
        let health_lua = run(&format!("{base}/healthz"), Some(health_lua));
        let rank = run(&format!("{base}/v1/rank"), Some(rank_lua));
        println!(
            "{who}, {connections} connections, round {round}: /healthz {:.0} req/s ({:.1} µs server CPU per request); through wrk's Lua request() {:.0} req/s ({:.1} µs); /v1/rank {:.0} req/s, p99 {:.2} ms, non-2xx {} ({:.1} µs); ratio {:.2} (to Lua {:.2}); server CPU rank/healthz {:.2}",
            health.rate,
            health.server_cpu_us,
            health_lua.rate,
            health_lua.server_cpu_us,
            rank.rate,
            rank.p99_ms,
            rank.non2xx,
            rank.server_cpu_us,
            rank.rate / health.rate,
            rank.rate / health_lua.rate,
            rank.server_cpu_us / health.server_cpu_us,
        );
        rounds.push((health, health_lua, rank));
    }
    let median = |f: &dyn Fn(&(Run, Run, Run)) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        q(&v, 0.5)
    };
    println!(
        "{who}, {connections} connections, median of {ROUNDS} rounds: /healthz {:.0} req/s ({:.1} µs); through Lua {:.0} req/s ({:.1} µs); /v1/rank {:.0} req/s, p99 {:.2} ms ({:.1} µs); ratio rank/healthz {:.2}, to /healthz through Lua {:.2}; server CPU per request rank/healthz {:.2}",
        median(&|r| r.0.rate),
        median(&|r| r.0.server_cpu_us),
        median(&|r| r.1.rate),
        median(&|r| r.1.server_cpu_us),
        median(&|r| r.2.rate),
        median(&|r| r.2.p99_ms),
        median(&|r| r.2.server_cpu_us),
        median(&|r| r.2.rate / r.0.rate),
        median(&|r| r.2.rate / r.1.rate),
        median(&|r| r.2.server_cpu_us / r.0.server_cpu_us),
    );
}

fn q(v: &[f64], f: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * f) as usize]
}

fn main() {
    let topic = format!("{}.labeled", unique("rankbench"));
    create_topics(&[(&topic, 4)]);
    let stream = labeled_stream_with(&topic, 200_000, 500, 17, false);
    produce_all(&stream.records);
    let port = free_port();
    let prefix = format!("{}:", unique("rankbench"));
    let s = start_scorer(&topic, &format!("{prefix}g"), &prefix, port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        Duration::from_secs(600),
        "the replica to reflect the whole stream",
        || {
            let body = http_get(&format!("{base}/readyz"))?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let versions: i64 = v["replica"]["partitions"]
                .as_array()?
                .iter()
                .map(|p| p["version"].as_i64().unwrap_or(-1) + 1)
                .sum();
            (v["ready"] == true && versions as usize >= stream.records.len()).then_some(())
        },
        || s.output(),
    );
    let dir = std::env::temp_dir().join(unique("rankbench"));
    std::fs::create_dir_all(&dir).unwrap();
    let lua = dir.join("rank.lua");
    std::fs::write(&lua, RANK_LUA).unwrap();
    println!(
        "machine: {} cores; the model: {} labels over 500 ads, 4 partitions; RSS {} MiB",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        stream.records.len(),
        s.rss_bytes().unwrap_or(0) >> 20
    );
    let health_lua = dir.join("health.lua");
    std::fs::write(&health_lua, HEALTH_LUA).unwrap();
    for connections in [16, 64] {
        throughput("the learner", &s, &base, connections, &lua, &health_lua);
    }
    // Half the rank rate measured above at 64 connections, offered in a closed loop: each
    // connection waits 1 ms (wrk's `delay()`, in whole milliseconds: its event loop's timer)
    // before each request, so a connection's cycle is 1 ms plus its answer's latency. The
    // number of connections is adjusted (up to four runs) until the achieved rate is within
    // 5% of half, with as few connections as make it: more connections waiting on longer
    // delays make burstier arrivals on the two shared cores, and wrk's own late timestamps
    // enter its latencies. (An earlier version asked 32 connections to wait ~1.0 ms each
    // when the full rate was ~66k: wrk cut the delay to 0 ms and measured the full rate.)
    let full = wrk(&s, &format!("{base}/v1/rank"), 64, Some(&lua)).rate;
    let half = full / 2.0;
    let paced = dir.join("paced.lua");
    std::fs::write(
        &paced,
        format!("{RANK_LUA}\nfunction delay() return 1 end\n"),
    )
    .unwrap();
    let mut paced_connections = (half * 1.3e-3).ceil() as u32;
    let mut at_half = wrk(
        &s,
        &format!("{base}/v1/rank"),
        paced_connections,
        Some(&paced),
    );
    for _ in 0..3 {
        if (at_half.rate / half - 1.0).abs() <= 0.05 {
            break;
        }
        paced_connections = ((paced_connections as f64) * half / at_half.rate).ceil() as u32;
        at_half = wrk(
            &s,
            &format!("{base}/v1/rank"),
            paced_connections,
            Some(&paced),
        );
    }
    println!(
        "at half load (half of {full:.0} req/s: {paced_connections} connections achieved {:.0}): p50 {:.2} ms, p99 {:.2} ms, non-2xx {}",
        at_half.rate, at_half.p50_ms, at_half.p99_ms, at_half.non2xx
    );
    for clicks in [false, true] {
        let (delays, acks) = freshness(&topic, port, clicks);
        println!(
            "freshness through the API ({}), ~2,000 labels/s background: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (the producer's acknowledgement: p50 {:.1} ms, p99 {:.1} ms)",
            if clicks {
                "click label produced -> the API's exact clicks move"
            } else {
                "negative label produced -> the API's answer moves"
            },
            q(&delays, 0.5),
            q(&delays, 0.99),
            q(&delays, 1.0),
            q(&acks, 0.5),
            q(&acks, 0.99)
        );
    }
    // The replica alone: a serving-only process over the same learners' state.
    let server_port = free_port();
    let server = start_scorer(
        &topic,
        &format!("{prefix}unused"),
        &prefix,
        server_port,
        &["--serve-only"],
    );
    let page = eventually(
        Duration::from_secs(120),
        "the serving-only process to be ready and report its size",
        || {
            http_get(&format!("http://127.0.0.1:{server_port}/readyz"))
                .filter(|b| b.contains("\"ready\":true"))?;
            std::thread::sleep(Duration::from_secs(2));
            http_get(&format!("http://127.0.0.1:{server_port}/metrics"))
                .filter(|p| p.contains("ctr_scorer_replica_parameters"))
        },
        || server.output(),
    );
    let parameters = metric(&page, "ctr_scorer_replica_parameters").unwrap_or(0.0);
    let totals = metric(&page, "ctr_scorer_replica_total_keys").unwrap_or(0.0);
    let rss = server.rss_bytes().unwrap_or(0) as f64;
    println!(
        "replica memory: serving-only RSS {:.1} MiB for {parameters:.0} parameters and {totals:.0} exact-total keys: {:.0} bytes per entry, the process's fixed cost included (learner + replica RSS {} MiB)",
        rss / (1u64 << 20) as f64,
        rss / (parameters + totals).max(1.0),
        s.rss_bytes().unwrap_or(0) >> 20
    );
    // The fleet's shape: the same load on the serving-only process (the learner idle beside it).
    let server_base = format!("http://127.0.0.1:{server_port}");
    for connections in [16, 64] {
        throughput(
            "serving-only",
            &server,
            &server_base,
            connections,
            &lua,
            &health_lua,
        );
    }
    server.stop();
    s.stop();
}
