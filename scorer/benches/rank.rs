//! The ranking API's work per request, in process (issue 16): parse and check a `/v1/rank`
//! body with 10 candidates, evaluate the serving variant (combined) for each from the
//! replica, rank, and serialize the answer: everything the handler does but HTTP. A third
//! figure asks the whole router (`ctr_scorer::api::router`: routing, the body limit, the
//! concurrency limit, the deadline, the handler, the response) with an in-memory request:
//! everything the process does per request but hyper's HTTP/1 and the socket.
//!
//! `cargo bench -p ctr-scorer --bench rank`; instruction counts (the figure the shared machine
//! cannot blur): `valgrind --tool=callgrind target/release/deps/rank-* --bench --profile-time 5`.
//!
//! The replica's state: 200,000 labels over 500 ads in 4 partitions (3 query categories × 3
//! geos × 2 devices), learned by the scorer's own partition state; each request is one of
//! 1,024 with a context mostly never seen and 10 distinct candidates of 600 ads (100 new).

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ctr_schemas::{Context, LabelKind, LabeledImpression};
use ctr_scorer::api::{ApiState, Limits, parse_rank, rank_with};
use ctr_scorer::config::parse_models;
use ctr_scorer::replica::Replica;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

const PARTITIONS: usize = 4;

fn replica() -> Replica {
    let models = parse_models("counts,ftrl,combined").unwrap();
    let mut rng = Pcg64Mcg::seed_from_u64(3);
    let pick = |rng: &mut Pcg64Mcg, v: &[&str]| v[rng.random_range(0..v.len())].to_string();
    let labels = (0..200_000i64).map(move |i| {
        let ad = rng.random_range(0..500);
        let ad_id = format!("ad-{ad:03}");
        let clicked = rng.random_bool(0.01 + 0.06 * f64::from(ad % 10) / 10.0);
        LabeledImpression {
            label_id: format!("{i}:{ad_id}"),
            serve_id: i,
            campaign_id: format!("camp-{}", ad % 7),
            position: rng.random_range(1..=4),
            context: Context {
                query_category: pick(&mut rng, &["travel", "shoes", "news"]),
                geo: pick(&mut rng, &["US", "DE", "FR"]),
                device: pick(&mut rng, &["mobile", "desktop"]),
                extra: Default::default(),
            },
            clicked,
            ts_ms: 1_760_000_000_000 + i * 20,
            click_ts_ms: clicked.then_some(1_760_000_000_000 + i * 20 + 500),
            kind: LabelKind::Label,
            ad_id,
        }
    });
    Replica::learned(&models, "combined", PARTITIONS, labels)
}

fn bodies() -> Vec<Vec<u8>> {
    let mut rng = Pcg64Mcg::seed_from_u64(9);
    (0..1_024)
        .map(|_| {
            let mut ads: Vec<u32> = Vec::new();
            while ads.len() < 10 {
                let n = rng.random_range(0..600);
                if !ads.contains(&n) {
                    ads.push(n);
                }
            }
            let candidates: Vec<String> = ads
                .iter()
                .enumerate()
                .map(|(i, &n)| match n {
                    0..500 => format!(r#"{{"ad_id":"ad-{n:03}","bid":{}.5}}"#, i % 4 + 1),
                    500..550 => format!(
                        r#"{{"ad_id":"new-{n:03}","bid":1.5,"campaign_id":"camp-{}"}}"#,
                        n % 7
                    ),
                    _ => format!(r#"{{"ad_id":"new-{n:03}","bid":1.5}}"#),
                })
                .collect();
            format!(
                r#"{{"context":{{"query_category":"q{}","geo":"g{}","device":"{}","hour":"{}"}},"candidates":[{}],"k":3}}"#,
                rng.random_range(1..=30),
                rng.random_range(1..=12),
                ["mobile", "desktop", "tablet"][rng.random_range(0..3)],
                rng.random_range(0..24),
                candidates.join(",")
            )
            .into_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let replica = replica();
    let bodies = bodies();
    let mut i = 0;
    c.bench_function("rank: parse, 10 candidates evaluated, serialize", |b| {
        b.iter(|| {
            i = (i + 1) % bodies.len();
            let (req, ctx) = parse_rank(&bodies[i]).unwrap();
            let response = rank_with(&replica, req, &ctx);
            black_box(serde_json::to_vec(&response).unwrap())
        })
    });
    let parsed: Vec<_> = bodies.iter().map(|b| parse_rank(b).unwrap()).collect();
    c.bench_function("rank: 10 candidates evaluated (parsed request)", |b| {
        b.iter(|| {
            i = (i + 1) % parsed.len();
            let (req, ctx) = &parsed[i];
            let req = ctr_scorer::api::RankRequest {
                context: req.context.clone(),
                candidates: req
                    .candidates
                    .iter()
                    .map(|c| ctr_scorer::api::Candidate {
                        ad_id: c.ad_id.clone(),
                        bid: c.bid,
                        campaign_id: c.campaign_id.clone(),
                    })
                    .collect(),
                k: req.k,
            };
            black_box(rank_with(&replica, req, ctx))
        })
    });
}

/// The whole router, asked in memory on a current-thread runtime.
fn router(c: &mut Criterion) {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let replica = std::sync::Arc::new(replica());
    let state = ApiState::new(
        Limits {
            max_concurrency: 512,
            timeout: std::time::Duration::from_millis(250),
        },
        replica,
        None,
        None,
        Default::default(),
        Default::default(),
    );
    let app = ctr_scorer::api::router(state);
    let bodies: Vec<axum::body::Bytes> = bodies().into_iter().map(Into::into).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut i = 0;
    c.bench_function(
        "rank: the router, in memory (all but HTTP/1 and the socket)",
        |b| {
            b.iter(|| {
                i = (i + 1) % bodies.len();
                let request = Request::post("/v1/rank")
                    .header("content-type", "application/json")
                    .body(Body::from(bodies[i].clone()))
                    .unwrap();
                let response = rt.block_on(async {
                    let response = app.clone().oneshot(request).await.unwrap();
                    assert!(response.status().is_success());
                    axum::body::to_bytes(response.into_body(), usize::MAX)
                        .await
                        .unwrap()
                });
                black_box(response)
            })
        },
    );
}

criterion_group!(benches, bench, router);
criterion_main!(benches);
