//! Timing an HTTP route's answers where the server sees them.
//!
//! A handler that times itself sees only the requests it gets to answer: not the ones a load
//! shedder refused, a deadline cut short or an extractor turned away. [`TimedLayer`] wraps a
//! route from the outside, so every answer is timed, from the moment the request reaches the
//! route (its head parsed) to the moment the answer is ready. It is the figure a deadline
//! promises, and the one a load test can hold the server to: a client's latency also holds the
//! time its packets spend in the kernel, which a loopback under a thousand connections can
//! lose and retransmit (docs/RELIABILITY.md §4).
//!
//! The metric is a Prometheus histogram with [`REQUEST_SECONDS_BUCKETS`] (set up by
//! [`crate::process::http_endpoint`] for every metric named `*_request_seconds`): buckets, not
//! a summary, so a fleet's histograms add up and the share of answers past a deadline is read
//! exactly.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::Histogram;

/// The name every timed route's metric ends with; [`crate::process::http_endpoint`] renders
/// such metrics as histograms with [`REQUEST_SECONDS_BUCKETS`].
pub const REQUEST_SECONDS_SUFFIX: &str = "_request_seconds";

/// The histogram buckets of `*_request_seconds`, in seconds: from half a millisecond (an
/// answer from memory) to ten seconds, with the default API deadline (250 ms) a bound.
pub const REQUEST_SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How an answer went, by its status: the `outcome` label.
const OUTCOMES: [&str; 4] = ["ok", "refused", "unavailable", "error"];

fn outcome(status: http::StatusCode) -> usize {
    match status.as_u16() {
        0..=399 => 0,
        503 => 2,
        400..=499 => 1,
        _ => 3,
    }
}

/// Times every answer of the route it wraps into `<metric>{route, outcome}`: `ok` (1xx–3xx),
/// `refused` (4xx), `unavailable` (503: shed, past the deadline, not ready) and `error` (other
/// 5xx). Apply it outside the route's limits so their refusals are timed too.
#[derive(Clone)]
pub struct TimedLayer {
    histograms: Arc<[Histogram; 4]>,
}

impl std::fmt::Debug for TimedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedLayer").finish_non_exhaustive()
    }
}

impl TimedLayer {
    /// Times a route into `metric` (which must end with [`REQUEST_SECONDS_SUFFIX`]) with the
    /// label `route`. The histograms are looked up once, here, not per request.
    pub fn new(metric: &'static str, route: &'static str) -> Self {
        debug_assert!(metric.ends_with(REQUEST_SECONDS_SUFFIX), "{metric}");
        Self {
            histograms: Arc::new(
                OUTCOMES.map(|o| metrics::histogram!(metric, "route" => route, "outcome" => o)),
            ),
        }
    }
}

impl<S> tower::Layer<S> for TimedLayer {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            histograms: Arc::clone(&self.histograms),
        }
    }
}

/// A route's service, timed (see [`TimedLayer`]).
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    histograms: Arc<[Histogram; 4]>,
}

impl<S> std::fmt::Debug for Timed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed").finish_non_exhaustive()
    }
}

impl<S, Req, B> tower::Service<Req> for Timed<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TimedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        TimedFuture {
            inner: self.inner.call(req),
            started: Instant::now(),
            histograms: Arc::clone(&self.histograms),
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a [`Timed`] route, recorded when it is ready.
    #[derive(Debug)]
    pub struct TimedFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        histograms: Arc<[Histogram; 4]>,
    }
}

impl<F, B, E> std::future::Future for TimedFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        // An error (none with axum, whose routes are infallible) leaves no answer to time.
        if let Ok(response) = &answer {
            this.histograms[outcome(response.status())]
                .record(this.started.elapsed().as_secs_f64());
        }
        Poll::Ready(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_their_outcomes() {
        let of = |s: u16| OUTCOMES[outcome(http::StatusCode::from_u16(s).unwrap())];
        assert_eq!(of(200), "ok");
        assert_eq!(of(204), "ok");
        assert_eq!(of(304), "ok");
        assert_eq!(of(400), "refused");
        assert_eq!(of(413), "refused");
        assert_eq!(of(429), "refused");
        assert_eq!(of(503), "unavailable");
        assert_eq!(of(500), "error");
        assert_eq!(of(504), "error");
    }

    /// Through the layer, each answer is recorded once, under its outcome, in the bucketed
    /// histogram the endpoint's recorder renders.
    #[tokio::test]
    async fn every_answer_is_timed_under_its_outcome() {
        use tower::{Layer, ServiceExt};
        let recorder = crate::process::prometheus_builder()
            .unwrap()
            .build_recorder();
        let prometheus = recorder.handle();
        let layer = metrics::with_local_recorder(&recorder, || {
            TimedLayer::new("test_request_seconds", "echo")
        });
        let route = layer.layer(tower::service_fn(|status: u16| async move {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().status(status).body(()).unwrap(),
            )
        }));
        for status in [200, 200, 503, 400] {
            let answer = route.clone().oneshot(status).await.unwrap();
            assert_eq!(answer.status().as_u16(), status);
        }
        let page = prometheus.render();
        let count = |outcome: &str| {
            let series =
                format!("test_request_seconds_count{{route=\"echo\",outcome=\"{outcome}\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|v| v.trim().parse::<u64>().unwrap())
        };
        assert_eq!(count("ok"), Some(2), "{page}");
        assert_eq!(count("unavailable"), Some(1), "{page}");
        assert_eq!(count("refused"), Some(1), "{page}");
        assert!(
            page.contains(r#"test_request_seconds_bucket{route="echo",outcome="ok",le="0.25"} 2"#),
            "a histogram with the deadline as a bucket bound:\n{page}"
        );
    }

    #[test]
    fn the_deadline_is_a_bucket_bound_and_the_buckets_increase() {
        assert!(REQUEST_SECONDS_BUCKETS.contains(&0.25));
        assert!(REQUEST_SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
