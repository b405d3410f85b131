//! Reading recorded traffic, streamed: every input is a [`Source`] of labeled impressions.
//!
//! - [`LabeledJsonl`]: labeled impressions as JSON lines.
//! - [`EventsJsonl`]: raw serves and clicks as JSON lines (the ingest adapter's event format),
//!   labeled by the joiner's own state machine ([`ctr_feedback::join::PartitionJoin`]) exactly
//!   as the live joiner would, with event time as its clock.
//!
//! Labeled lines: one object per line: `{"ts_ms": int, "ad_id": string, "position": int, "context": {string:
//! string}, "clicked": bool}`; unknown fields are ignored. Optional: `campaign_id` (else
//! `"none"`: the count model's campaign level then pools every ad) and `label_id` (else the
//! line number: without IDs there is nothing to deduplicate). `context` may hold any fields
//! (at most 32; names and values tokens): the search-ad fields (`query_category`, `geo`,
//! `device`) are required only on the live event contract, and the models learn whatever
//! fields a log has.

use std::collections::BTreeMap;
use std::io::BufRead;

use ctr_schemas::{Context, LabelKind, LabeledImpression};
use serde::Deserialize;

/// One line of a labeled JSONL file.
#[derive(Debug, Deserialize)]
struct LabeledLine {
    ts_ms: i64,
    ad_id: String,
    position: i32,
    context: BTreeMap<String, String>,
    clicked: bool,
    #[serde(default)]
    campaign_id: Option<String>,
    #[serde(default)]
    label_id: Option<String>,
    #[serde(default)]
    kind: LabelKind,
}

/// Where labeled impressions come from, one at a time.
pub trait Source {
    /// The next impression; `Ok(None)` at the end; `Err(Ok(bad))` for an unusable line (the
    /// caller may skip it and go on), `Err(Err(io))` when the input cannot be read.
    fn next_labeled(&mut self) -> Next;

    /// Facts about the input worth reporting (the joiner's counts, say).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

impl<S: Source + ?Sized> Source for Box<S> {
    fn next_labeled(&mut self) -> Next {
        (**self).next_labeled()
    }

    fn notes(&self) -> Vec<String> {
        (**self).notes()
    }
}

/// What [`Source::next_labeled`] returns.
pub type Next = Result<Option<LabeledImpression>, Result<BadLine, std::io::Error>>;

/// A record that could not be used, with where it was: `line 17` (from 1) in a file,
/// `partition 2 offset 4711` in a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct BadLine {
    /// Where: `line 17` or `partition 2 offset 4711`.
    pub at: String,
    /// What is wrong.
    pub problem: String,
}

impl BadLine {
    /// A bad line of a file (`line` counts from 1).
    pub fn line(line: u64, problem: String) -> Self {
        Self {
            at: format!("line {line}"),
            problem,
        }
    }
}

/// Labeled impressions from JSON lines, one at a time.
#[derive(Debug)]
pub struct LabeledJsonl<R> {
    reader: R,
    line: u64,
    buf: String,
}

impl<R: BufRead> LabeledJsonl<R> {
    /// Lines from `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            line: 0,
            buf: String::new(),
        }
    }
}

impl<R: BufRead> Source for LabeledJsonl<R> {
    fn next_labeled(&mut self) -> Next {
        if !next_line(&mut self.reader, &mut self.buf, &mut self.line).map_err(Err)? {
            return Ok(None);
        }
        let bad = |problem: String| Err(Ok(BadLine::line(self.line, problem)));
        let l: LabeledLine = match serde_json::from_str(&self.buf) {
            Ok(l) => l,
            Err(e) => return bad(e.to_string()),
        };
        let context = match Context::from_any_fields(l.context) {
            Ok(c) => c,
            Err(e) => return bad(format!("{}: {}", e.field, e.problem)),
        };
        let clicked = l.clicked;
        let labeled = LabeledImpression {
            label_id: l.label_id.unwrap_or_else(|| format!("line:{}", self.line)),
            serve_id: self.line as i64,
            ad_id: l.ad_id,
            campaign_id: l.campaign_id.unwrap_or_else(|| "none".into()),
            position: l.position,
            context,
            clicked,
            ts_ms: l.ts_ms,
            click_ts_ms: clicked.then_some(l.ts_ms),
            kind: l.kind,
        };
        // The value rules of the labeled-impression contract, but the ID rule (these lines
        // carry no serve IDs).
        if let Err(e) = ctr_schemas::events::check_token("ad_id", &labeled.ad_id)
            .and_then(|()| ctr_schemas::events::check_token("campaign_id", &labeled.campaign_id))
        {
            return bad(e.to_string());
        }
        if labeled.position < 1 {
            return bad("position: must be 1 or more".into());
        }
        if labeled.ts_ms <= 0 {
            return bad("ts_ms: must be milliseconds since the Unix epoch".into());
        }
        Ok(Some(labeled))
    }
}

/// Reads the next non-blank line into `buf`; `Ok(false)` at the end.
fn next_line(reader: &mut impl BufRead, buf: &mut String, line: &mut u64) -> std::io::Result<bool> {
    loop {
        buf.clear();
        if reader.read_line(buf)? == 0 {
            return Ok(false);
        }
        *line += 1;
        if !buf.trim().is_empty() {
            return Ok(true);
        }
    }
}

/// Raw serves and clicks (JSON lines of the ingest format), labeled by the joiner's state
/// machine. Its clock is event time: the newest event time read stands for the wall clock, and
/// at the end of the input every open window is closed as if the input had gone idle.
pub struct EventsJsonl<R> {
    reader: R,
    line: u64,
    buf: String,
    preparer: ctr_ingest::json::Preparer,
    join: Option<ctr_feedback::join::PartitionJoin>,
    join_cfg: ctr_feedback::join::JoinConfig,
    clock_ms: i64,
    emitted: Vec<ctr_feedback::join::Emit>,
    ready: std::collections::VecDeque<LabeledImpression>,
    finished: bool,
    orphans: u64,
}

impl<R> std::fmt::Debug for EventsJsonl<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsJsonl")
            .field("line", &self.line)
            .field("clock_ms", &self.clock_ms)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> EventsJsonl<R> {
    /// Events from `reader`, joined into labels as the joiner would with `join_cfg`.
    pub fn new(reader: R, join_cfg: ctr_feedback::join::JoinConfig) -> Self {
        let ids = ctr_schemas::IdGenerator::new(0).expect("shard 0 exists");
        Self {
            reader,
            line: 0,
            buf: String::new(),
            // Recorded traffic: any event time; IDs assigned only to events recorded without.
            preparer: ctr_ingest::json::Preparer::new(ids, None, usize::MAX),
            join: None,
            join_cfg,
            clock_ms: i64::MIN,
            emitted: Vec::new(),
            ready: std::collections::VecDeque::new(),
            finished: false,
            orphans: 0,
        }
    }

    fn take_emitted(&mut self) {
        use ctr_feedback::join::Emit;
        for e in self.emitted.drain(..) {
            match e {
                Emit::Label(l) | Emit::Correction(l) => self.ready.push_back(l.to_labeled()),
                Emit::Orphan(_) => self.orphans += 1,
            }
        }
    }
}

impl<R: BufRead> Source for EventsJsonl<R> {
    fn next_labeled(&mut self) -> Next {
        use ctr_ingest::json::Event;
        loop {
            if let Some(l) = self.ready.pop_front() {
                return Ok(Some(l));
            }
            if self.finished {
                return Ok(None);
            }
            if !next_line(&mut self.reader, &mut self.buf, &mut self.line).map_err(Err)? {
                // End of input: let every window close, as an idle stream would.
                self.finished = true;
                if let Some(j) = &mut self.join {
                    let cfg = self.join_cfg;
                    let end = self.clock_ms.saturating_add(
                        cfg.idle_ms + cfg.window_ms + cfg.grace_ms + cfg.late_horizon_ms + 1,
                    );
                    j.advance(end, &mut self.emitted);
                    j.advance(end.saturating_add(cfg.idle_ms + 1), &mut self.emitted);
                }
                self.take_emitted();
                continue;
            }
            let bad = |line, problem| Err(Ok(BadLine::line(line, problem)));
            let value = match serde_json::from_str(&self.buf) {
                Ok(v) => v,
                Err(e) => return bad(self.line, e.to_string()),
            };
            let event = match self.preparer.parse_value(value, 0) {
                Ok(e) => e,
                Err(problem) => return bad(self.line, problem),
            };
            self.clock_ms = self.clock_ms.max(event.ts_ms());
            let now = self.clock_ms;
            let cfg = self.join_cfg;
            let join = self
                .join
                .get_or_insert_with(|| ctr_feedback::join::PartitionJoin::new(cfg, now));
            match event {
                Event::Serve(s) => join.on_serve(s, now, &mut self.emitted),
                Event::Click(c) => join.on_click(c, now, &mut self.emitted),
            }
            join.advance(now, &mut self.emitted);
            self.take_emitted();
        }
    }

    fn notes(&self) -> Vec<String> {
        let Some(j) = &self.join else {
            return vec!["no events".into()];
        };
        let s = j.stats();
        vec![format!(
            "joiner (window {} ms, grace {} ms): {} serves, {} clicks joined, {} late clicks,              {} duplicate clicks, {} orphan clicks",
            self.join_cfg.window_ms,
            self.join_cfg.grace_ms,
            s.serves,
            s.positives,
            s.late_clicks,
            s.duplicate_clicks,
            self.orphans
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Vec<Result<String, String>> {
        let mut r = LabeledJsonl::new(text.as_bytes());
        let mut out = Vec::new();
        loop {
            match r.next_labeled() {
                Ok(None) => return out,
                Ok(Some(l)) => out.push(Ok(format!("{}@{}:{}", l.ad_id, l.position, l.clicked))),
                Err(Ok(bad)) => out.push(Err(bad.to_string())),
                Err(Err(e)) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn lines_become_labeled_impressions_and_bad_lines_are_named() {
        let ctx = r#""context":{"query_category":"q","geo":"g","device":"d","hour":"3"}"#;
        let text = format!(
            "{{\"ts_ms\":5,\"ad_id\":\"a\",\"position\":1,{ctx},\"clicked\":true,\"extra\":1}}\n\n\
             {{\"ts_ms\":6,\"ad_id\":\"a\",\"position\":0,{ctx},\"clicked\":false}}\n\
             {{\"ts_ms\":7,\"ad_id\":\"b\",\"position\":2,\"context\":{{\"user\":\"\"}},\"clicked\":false}}\n\
             not json\n\
             {{\"ts_ms\":8,\"ad_id\":\"b\",\"position\":2,{ctx},\"clicked\":false}}\n\
             {{\"ts_ms\":9,\"ad_id\":\"c\",\"position\":1,\"context\":{{\"user\":\"u1\"}},\"clicked\":true}}\n"
        );
        let got = read(&text);
        assert_eq!(got[0], Ok("a@1:true".to_string()));
        assert_eq!(
            got[1],
            Err("line 3: position: must be 1 or more".to_string())
        );
        assert_eq!(
            got[2],
            Err("line 4: context value: must not be empty".to_string())
        );
        assert!(got[3].as_ref().unwrap_err().starts_with("line 5: expected"));
        assert_eq!(got[4], Ok("b@2:false".to_string()));
        // Any context fields: none of the search-ad fields is needed.
        assert_eq!(got[5], Ok("c@1:true".to_string()));
    }
}
