//! The monitoring dashboard in a real browser (issue #7): the pipeline runs with live simulated
//! traffic, Debian's Chromium (driven by Playwright, `e2e/browser/dashboard.mjs`) loads the
//! page from the scorer, and the page must draw charts and tables from the live view.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ctr_e2e::*;

use crate::pipeline::{feedback, scorer, topics};

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[test]
fn the_dashboard_draws_live_data_in_a_real_browser() {
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir()
            && PathBuf::from("/usr/bin/chromium").exists(),
        "the browser test needs Chromium and Playwright: run scripts/browser-env (scripts/test does)"
    );
    let t = topics("dash");
    let prefix = format!("{}:", t.serves);
    let port = free_port();
    let scorer = scorer(&t, &prefix, port);
    let feedback = feedback(&t);
    // Live traffic in wall-clock time for the whole test.
    let sim = Service::start(
        "simulate",
        "ctr-ingest",
        &[
            "simulate".into(),
            format!("--brokers={}", brokers()),
            format!("--serves-topic={}", t.serves),
            format!("--clicks-topic={}", t.clicks),
            "--seed=77".into(),
            "--rate=400".into(),
            "--click-delay-max-ms=3000".into(),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    // Enough history for lines (a point every 2 s), and a view with learned models and ads.
    let view = eventually(
        Duration::from_secs(120),
        "a view with history, models and ads",
        || {
            let v: serde_json::Value =
                serde_json::from_str(&http_get(&format!("{base}/v1/monitor"))?).ok()?;
            let ready = v["history"]["ts_ms"].as_array()?.len() >= 8
                && v["latest"]["records"]["learned"].as_u64()? > 1_000
                && !v["latest"]["ads"].as_array()?.is_empty()
                && v["latest"]["models"].as_array()?.len() == 3;
            ready.then_some(v)
        },
        || {
            format!(
                "scorer:\n{}\nfeedback:\n{}",
                scorer.output(),
                feedback.output()
            )
        },
    );
    assert_eq!(view["latest"]["joiner"]["instances"], 1);
    assert_eq!(view["latest"]["partitions"].as_array().unwrap().len(), 4);

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e/dashboard.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .arg(&base)
        .arg(&shot)
        .arg("6")
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser check failed:\n{stdout}\n{}\nscorer:\n{}",
        String::from_utf8_lossy(&out.stderr),
        scorer.output()
    );
    eprintln!("dashboard: {stdout}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        summary["models"],
        serde_json::json!(["combined", "counts", "ftrl"])
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 50_000,
        "a real screenshot"
    );

    // Read-only: the page's routes answer GET only.
    let (status, _) = http_post_json(&format!("{base}/v1/monitor"), "{}");
    assert_eq!(status, 405);
    sim.stop();
    feedback.stop();
    scorer.stop();
}
