//! The monitoring dashboard over HTTP: `GET /dashboard` (the page), its static files, and
//! `GET /v1/monitor` (the system view and its history as JSON, see [`crate::monitor`]).
//!
//! The page and its one library (uPlot, vendored under `scorer/dashboard/vendor/` with its
//! license) are compiled into the binary, so the dashboard works offline and with no CDN.
//! Everything here is read-only: GET only, nothing that changes a model or an estimate.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::monitor::Monitor;

/// (file name, content type, content) of every file the page loads.
const FILES: [(&str, &str, &str); 5] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../dashboard/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../dashboard/style.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../dashboard/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../dashboard/vendor/uplot-1.6.32/uPlot.min.css"),
    ),
];

/// The dashboard's routes: the page and `/v1/monitor`, read-only.
pub fn router(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route(
            "/dashboard",
            get(|| async { Redirect::permanent("/dashboard/") }),
        )
        .route("/dashboard/", get(|| file(Path("index.html".to_string()))))
        .route("/dashboard/{file}", get(file))
        .route("/v1/monitor", get(monitor_json))
        .with_state(monitor)
}

async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such dashboard file").into_response(),
    }
}

async fn monitor_json(State(monitor): State<Arc<Monitor>>) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(monitor.response()),
    )
        .into_response()
}
