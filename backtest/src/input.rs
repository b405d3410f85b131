//! Reading recorded traffic: labeled impressions as JSON lines, streamed.
//!
//! One object per line: `{"ts_ms": int, "ad_id": string, "position": int, "context": {string:
//! string}, "clicked": bool}`; unknown fields are ignored. Optional: `campaign_id` (else
//! `"none"`: the count model's campaign level then pools every ad) and `label_id` (else the
//! line number: without IDs there is nothing to deduplicate). `context` needs `query_category`,
//! `geo` and `device`; other fields are extra context fields, as everywhere in the project.

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
}

/// A line that could not be used, with its number (from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct BadLine {
    pub line: u64,
    pub problem: String,
}

/// Labeled impressions from JSON lines, one at a time.
#[derive(Debug)]
pub struct LabeledJsonl<R> {
    reader: R,
    line: u64,
    buf: String,
}

impl<R: BufRead> LabeledJsonl<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            line: 0,
            buf: String::new(),
        }
    }

    /// The next impression; `Ok(None)` at the end; `Err(Ok(bad))` for an unusable line (the
    /// caller may skip it and go on), `Err(Err(io))` when the file cannot be read.
    pub fn next_labeled(
        &mut self,
    ) -> Result<Option<LabeledImpression>, Result<BadLine, std::io::Error>> {
        loop {
            self.buf.clear();
            if self.reader.read_line(&mut self.buf).map_err(Err)? == 0 {
                return Ok(None);
            }
            self.line += 1;
            if !self.buf.trim().is_empty() {
                break;
            }
        }
        let bad = |problem: String| {
            Err(Ok(BadLine {
                line: self.line,
                problem,
            }))
        };
        let l: LabeledLine = match serde_json::from_str(&self.buf) {
            Ok(l) => l,
            Err(e) => return bad(e.to_string()),
        };
        let context = match Context::from_fields(l.context) {
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
            kind: LabelKind::Label,
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
             {{\"ts_ms\":7,\"ad_id\":\"b\",\"position\":2,\"context\":{{}},\"clicked\":false}}\n\
             not json\n\
             {{\"ts_ms\":8,\"ad_id\":\"b\",\"position\":2,{ctx},\"clicked\":false}}\n"
        );
        let got = read(&text);
        assert_eq!(got[0], Ok("a@1:true".to_string()));
        assert_eq!(
            got[1],
            Err("line 3: position: must be 1 or more".to_string())
        );
        assert_eq!(
            got[2],
            Err("line 4: context.query_category: missing".to_string())
        );
        assert!(got[3].as_ref().unwrap_err().starts_with("line 5: expected"));
        assert_eq!(got[4], Ok("b@2:false".to_string()));
    }
}
