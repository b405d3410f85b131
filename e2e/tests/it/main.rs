//! End-to-end tests through the real broker and Redis. One binary; one module per subject.

mod backtest;
mod broker;
mod chaos;
mod checkpoint;
mod dashboard;
mod ingest;
mod joiner;
mod outage;
mod pipeline;
mod reliability;
mod scorer;
mod serving;
