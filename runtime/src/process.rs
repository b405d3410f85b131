//! A service process: its logs, its shutdown signal, the supervisor of its long-lived tasks
//! and the liveness of its work loops.
//!
//! The [`Supervisor`] is the one place a service's tasks are spawned (mini-redis's server
//! loop, generalised): the first task that fails, panics or ends before it was asked to stop
//! cancels the others (they see the stop signal and drain: publish, checkpoint, commit), and
//! the process exits non-zero with a message naming that task. A task whose handle is dropped
//! cannot fail unseen, and a process cannot stay alive with its work loop gone (the joiner's
//! HTTP endpoint used to hold its process up after the join loop had failed on a frozen Redis).
//!
//! [`Liveness`] is what `/healthz` reports: each work loop beats once per step (its idle ticks
//! included, so an empty topic is an honest idle), and a loop that has not beaten within its
//! bound is reported stale.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tracing::{error, info, warn};

/// Logs to standard error (standard output stays free for a command's own output), filtered by
/// `RUST_LOG`, default `info` with librdkafka's own chatter at `warn`.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM. A handler that cannot be installed is logged and that
/// signal is then not waited for (the other still is; SIGKILL always works).
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

/// Why a service's HTTP endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The Prometheus recorder could not be installed (one per process).
    #[error("installing the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// The address could not be bound.
    #[error("binding the HTTP endpoint to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it could not be bound.
        source: std::io::Error,
    },
}

/// The process's Prometheus recorder as every service sets it up: metrics named
/// `*_request_seconds` (the answers [`crate::http::TimedLayer`] times) are histograms with
/// [`crate::http::REQUEST_SECONDS_BUCKETS`]; other histograms are summaries.
pub fn prometheus_builder()
-> Result<metrics_exporter_prometheus::PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Suffix(crate::http::REQUEST_SECONDS_SUFFIX.into()),
        crate::http::REQUEST_SECONDS_BUCKETS,
    )
}

/// A service's HTTP endpoint: installs the process's Prometheus recorder (what `/metrics`
/// renders) and binds `addr`.
pub async fn http_endpoint(
    addr: std::net::SocketAddr,
) -> Result<
    (
        metrics_exporter_prometheus::PrometheusHandle,
        tokio::net::TcpListener,
    ),
    EndpointError,
> {
    let metrics = prometheus_builder()?.install_recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| EndpointError::Bind { addr, source })?;
    Ok((metrics, listener))
}

/// The shutdown signal as a service's `run` takes it.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The `main` of a service (mini-redis's shape): logs to standard error, checks `settings`,
/// sets up the HTTP endpoint at `http_addr(&settings)`, then awaits `run` until SIGINT or
/// SIGTERM. A failure anywhere is logged with its whole chain and exits non-zero.
pub async fn service_main<C, E, R, Fut, RE>(
    name: &str,
    settings: Result<C, E>,
    http_addr: impl FnOnce(&C) -> std::net::SocketAddr,
    run: R,
) -> std::process::ExitCode
where
    E: Display,
    R: FnOnce(
        C,
        tokio::net::TcpListener,
        Option<metrics_exporter_prometheus::PrometheusHandle>,
        Shutdown,
    ) -> Fut,
    Fut: Future<Output = Result<(), RE>>,
    RE: Display,
{
    init_tracing();
    let result = async {
        let config = settings.map_err(|e| format!("checking settings: {e}"))?;
        let (metrics, listener) = http_endpoint(http_addr(&config))
            .await
            .map_err(|e| e.to_string())?;
        run(config, listener, Some(metrics), Box::pin(shutdown_signal()))
            .await
            .map_err(|e| format!("{e:#}"))
    }
    .await;
    exit_code(name, result)
}

/// Resolves once `stop` turns true (or its sender is gone). Holds no lock across an await, so
/// a task that selects on it stays `Send`.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Logs `result` and turns it into the process's exit code (`{e:#}` prints a whole error
/// chain). A failure exits at once: what could be drained was drained by the supervisor, and
/// the destructors left (a Kafka client closing against a broker that does not answer) could
/// otherwise hold the process up, alive and idle.
pub fn exit_code<E: Display>(service: &str, result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "{service} failed");
            std::process::exit(1)
        }
    }
}

/// Why a supervised process stopped with an error: the first task that failed, and what
/// else went wrong while the others drained.
#[derive(Debug, thiserror::Error)]
#[error("{first}{}", if .also.is_empty() { String::new() } else { format!(" (then: {})", .also.join("; ")) })]
pub struct TaskFailed {
    /// The first failure, naming its task.
    pub first: String,
    /// Later failures while draining.
    pub also: Vec<String>,
}

struct Exit {
    name: &'static str,
    result: Result<(), String>,
}

/// Runs a service's long-lived tasks; see the module docs.
pub struct Supervisor {
    tasks: JoinSet<Exit>,
    names: HashMap<tokio::task::Id, &'static str>,
    stop: watch::Sender<bool>,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.names.values().collect();
        names.sort();
        f.debug_struct("Supervisor")
            .field("tasks", &names)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

impl Supervisor {
    /// A supervisor whose tasks get `drain_timeout` to finish once stopped; past it they are
    /// aborted and that is an error.
    pub fn new(drain_timeout: Duration) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            stop,
            drain_timeout,
        }
    }

    /// The signal every task watches: it turns `true` when the process stops (shutdown
    /// requested, or a task failed).
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Runs `task` until the process stops. It must run until the stop signal: ending earlier,
    /// even with `Ok`, stops the process with an error naming `name`.
    pub fn spawn<E, F>(&mut self, name: &'static str, task: F)
    where
        E: Display,
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let handle = self.tasks.spawn(async move {
            Exit {
                name,
                result: task.await.map_err(|e| format!("{e:#}")),
            }
        });
        self.names.insert(handle.id(), name);
    }

    /// [`Supervisor::spawn`] for a task that cannot fail (it can still panic or end early).
    pub fn spawn_infallible<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Waits until `shutdown` resolves or a task ends, stops every task, waits for them to
    /// drain, and reports the first failure.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), TaskFailed> {
        let mut failures = Vec::new();
        tokio::select! {
            () = shutdown => info!("shutdown requested; draining"),
            Some(done) = self.tasks.join_next_with_id() => {
                if let Some(f) = self.judge(done, false) {
                    error!(failure = %f, "a task stopped; stopping the others");
                    failures.push(f);
                }
            }
        }
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(done)) => failures.extend(self.judge(done, true)),
                Ok(None) => break,
                Err(_) => {
                    let mut left: Vec<&str> = self.names.values().copied().collect();
                    left.sort_unstable();
                    self.tasks.abort_all();
                    failures.push(format!(
                        "{} did not stop within {:?} of the stop signal",
                        left.join(", "),
                        self.drain_timeout
                    ));
                    break;
                }
            }
        }
        let mut failures = failures.into_iter();
        match failures.next() {
            None => Ok(()),
            Some(first) => Err(TaskFailed {
                first,
                also: failures.collect(),
            }),
        }
    }

    /// What a task's end means: `None` if it is a clean stop.
    fn judge(
        &mut self,
        done: Result<(tokio::task::Id, Exit), JoinError>,
        stopping: bool,
    ) -> Option<String> {
        match done {
            Ok((id, exit)) => {
                self.names.remove(&id);
                match exit.result {
                    Ok(()) if stopping => None,
                    Ok(()) => Some(format!(
                        "{} ended before the process was stopped",
                        exit.name
                    )),
                    Err(e) => Some(format!("{} failed: {e}", exit.name)),
                }
            }
            Err(e) => {
                let name = self.names.remove(&e.id()).unwrap_or("a task");
                Some(if e.is_panic() {
                    format!("{name} panicked: {}", panic_message(e))
                } else {
                    format!("{name} was cancelled")
                })
            }
        }
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// The work loops of a process and when each last made a step; see the module docs.
#[derive(Debug, Clone)]
pub struct Liveness {
    origin: Instant,
    loops: Arc<Mutex<Vec<Arc<Beat>>>>,
}

#[derive(Debug)]
struct Beat {
    name: String,
    bound: Duration,
    /// Milliseconds since [`Liveness::origin`] of the last step.
    last_ms: AtomicU64,
}

/// A work loop's handle: [`Heartbeat::beat`] once per step.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    origin: Instant,
    beat: Arc<Beat>,
}

impl Heartbeat {
    /// Records a step now.
    pub fn beat(&self) {
        self.beat
            .last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One loop's state, as `/healthz` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopHealth {
    /// The loop's name (`"joiner"`, `"worker 1"`).
    pub name: String,
    /// Time since its last step.
    pub since_last_step: Duration,
    /// Longest it may go without a step.
    pub bound: Duration,
}

impl LoopHealth {
    /// Whether the loop stepped within its bound.
    pub fn alive(&self) -> bool {
        self.since_last_step <= self.bound
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            loops: Arc::default(),
        }
    }
}

impl Liveness {
    /// Registers a work loop that must step at least every `bound`; it counts as stepping now.
    pub fn register(&self, name: impl Into<String>, bound: Duration) -> Heartbeat {
        let beat = Arc::new(Beat {
            name: name.into(),
            bound,
            last_ms: AtomicU64::new(self.origin.elapsed().as_millis() as u64),
        });
        self.loops
            .lock()
            .expect("liveness registry lock is never held across a panic")
            .push(Arc::clone(&beat));
        Heartbeat {
            origin: self.origin,
            beat,
        }
    }

    /// Every registered loop, with the time since its last step.
    pub fn report(&self) -> Vec<LoopHealth> {
        let now = self.origin.elapsed().as_millis() as u64;
        self.loops
            .lock()
            .expect("liveness registry lock is never held across a panic")
            .iter()
            .map(|b| LoopHealth {
                name: b.name.clone(),
                since_last_step: Duration::from_millis(
                    now.saturating_sub(b.last_ms.load(Ordering::Relaxed)),
                ),
                bound: b.bound,
            })
            .collect()
    }

    /// `Ok` when every loop stepped within its bound; else a line per stale loop.
    pub fn check(&self) -> Result<(), String> {
        let stale: Vec<String> = self
            .report()
            .into_iter()
            .filter(|l| !l.alive())
            .map(|l| {
                format!(
                    "{}: no step for {:.1} s (bound {:.1} s)",
                    l.name,
                    l.since_last_step.as_secs_f64(),
                    l.bound.as_secs_f64()
                )
            })
            .collect();
        if stale.is_empty() {
            Ok(())
        } else {
            Err(stale.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_stopped(mut stop: watch::Receiver<bool>) {
        let _ = stop.wait_for(|s| *s).await;
    }

    #[tokio::test]
    async fn a_clean_shutdown_drains_every_task() {
        let mut sup = Supervisor::new(Duration::from_secs(5));
        let drained = Arc::new(AtomicU64::new(0));
        for name in ["a", "b"] {
            let stop = sup.stop_signal();
            let drained = Arc::clone(&drained);
            sup.spawn_infallible(name, async move {
                until_stopped(stop).await;
                drained.fetch_add(1, Ordering::SeqCst);
            });
        }
        sup.run(async {}).await.unwrap();
        assert_eq!(drained.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_first_failure_stops_the_others_and_is_reported() {
        let mut sup = Supervisor::new(Duration::from_secs(5));
        let stop = sup.stop_signal();
        sup.spawn_infallible("http", until_stopped(stop));
        sup.spawn("guard", async {
            Err::<(), _>("reading the signal: WRONGTYPE")
        });
        let e = sup.run(std::future::pending()).await.unwrap_err();
        assert_eq!(e.first, "guard failed: reading the signal: WRONGTYPE");
        assert!(e.also.is_empty(), "{e}");
    }

    #[tokio::test]
    async fn a_panic_or_an_early_end_is_a_failure() {
        let mut sup = Supervisor::new(Duration::from_secs(5));
        let stop = sup.stop_signal();
        sup.spawn_infallible("http", until_stopped(stop));
        sup.spawn_infallible("monitor", async { panic!("index out of bounds") });
        let e = sup.run(std::future::pending()).await.unwrap_err();
        assert_eq!(e.first, "monitor panicked: index out of bounds");

        let mut sup = Supervisor::new(Duration::from_secs(5));
        sup.spawn_infallible("consumer", async {});
        let e = sup.run(std::future::pending()).await.unwrap_err();
        assert_eq!(e.first, "consumer ended before the process was stopped");
    }

    #[tokio::test]
    async fn a_task_that_does_not_drain_is_aborted_and_reported() {
        let mut sup = Supervisor::new(Duration::from_millis(200));
        sup.spawn_infallible("stuck", std::future::pending());
        let e = sup.run(async {}).await.unwrap_err();
        assert_eq!(
            e.first,
            "stuck did not stop within 200ms of the stop signal"
        );
    }

    #[test]
    fn a_loop_that_stops_beating_is_stale() {
        let live = Liveness::default();
        let fast = live.register("fast", Duration::from_secs(3600));
        let _slow = live.register("slow", Duration::ZERO);
        fast.beat();
        std::thread::sleep(Duration::from_millis(5));
        let err = live.check().unwrap_err();
        assert!(err.starts_with("slow: no step for"), "{err}");
        assert!(!err.contains("fast"), "{err}");
    }
}
