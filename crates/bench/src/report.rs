//! The result of a run: a human-readable summary, then exactly one line of JSON.

use std::io::Write;

use serde::Serialize;

/// End-to-end or confirm latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyUs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest observed.
    pub max: f64,
}

/// What a scenario measured. Serialised as the JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `publish`, `consume`, `latency`, `fanout`, `outbox` or `idempotent`.
    pub scenario: &'static str,
    /// The broker's `host:port` (never the credentials).
    pub host: String,
    /// The scenario's parameters, as given or defaulted.
    pub params: serde_json::Value,
    /// Messages counted: confirmed, committed or sent (publish), consumed (consume),
    /// received (latency), published and confirmed (fanout), relayed (outbox),
    /// processed and acknowledged (idempotent).
    pub messages: u64,
    /// Wall time of the measured phase.
    pub duration_secs: f64,
    /// Messages per second over the measured phase.
    pub msgs_per_sec: f64,
    /// Body MiB per second over the measured phase.
    pub mib_per_sec: f64,
    /// Confirm / commit / end-to-end latency, where the scenario measures one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<LatencyUs>,
    /// What `latency_us` measures: `confirm`, `commit`, `end-to-end` or
    /// `enqueue-commit` (one outbox enqueue transaction, begin to commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_kind: Option<&'static str>,
    /// Scenario-specific figures (nacks, delivered rate, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// Fills in the rates from `messages`, `duration_secs` and the body size.
    #[must_use]
    pub fn new(
        scenario: &'static str,
        host: String,
        params: serde_json::Value,
        messages: u64,
        duration_secs: f64,
        body_size: usize,
    ) -> Self {
        let msgs_per_sec = crate::common::rate(messages, duration_secs);
        Report {
            scenario,
            host,
            params,
            messages,
            // Microseconds: a fast run of a few hundred messages must not read as 0 s.
            duration_secs: round(duration_secs, 6),
            msgs_per_sec: round(msgs_per_sec, 1),
            mib_per_sec: round(msgs_per_sec * body_size as f64 / (1024.0 * 1024.0), 2),
            latency_us: None,
            latency_kind: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Sets the latency percentiles and what they measure.
    #[must_use]
    pub fn with_latency(mut self, kind: &'static str, latency: Option<LatencyUs>) -> Self {
        if latency.is_some() {
            self.latency_us = latency;
            self.latency_kind = Some(kind);
        }
        self
    }

    /// Adds one scenario-specific figure.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// The summary lines, without the JSON.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut out = format!("holdfast bench {} against {}\n", self.scenario, self.host);
        if let serde_json::Value::Object(params) = &self.params {
            let list: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("  params      {}\n", list.join(" ")));
        }
        out.push_str(&format!(
            "  messages    {} in {:.3} s\n  throughput  {:.0} msg/s, {:.2} MiB/s\n",
            self.messages, self.duration_secs, self.msgs_per_sec, self.mib_per_sec
        ));
        for (key, value) in &self.extra {
            out.push_str(&format!("  {key:<11} {value}\n"));
        }
        if let (Some(l), Some(kind)) = (self.latency_us, self.latency_kind) {
            out.push_str(&format!(
                "  {kind} latency (µs)  p50 {}  p99 {}  p99.9 {}  max {}\n",
                l.p50, l.p99, l.p999, l.max
            ));
        }
        out
    }

    /// The JSON line (no newline).
    ///
    /// # Errors
    /// Never in practice: every field serialises.
    pub fn json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Prints the summary, then the JSON line, on stdout.
    ///
    /// # Errors
    /// When stdout cannot be written.
    pub fn print(&self) -> std::io::Result<()> {
        let json = self.json().map_err(std::io::Error::other)?;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", self.summary())?;
        writeln!(stdout, "{json}")?;
        stdout.flush()
    }
}

fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_one_line_with_the_fields() {
        let report = Report::new(
            "publish",
            "127.0.0.1:5672".into(),
            serde_json::json!({"producers": 2}),
            2000,
            0.5,
            1024,
        )
        .with_latency(
            "confirm",
            Some(LatencyUs {
                p50: 1.0,
                p99: 2.0,
                p999: 3.0,
                max: 4.0,
            }),
        )
        .with("nacked", 0);
        let json = report.json().expect("serialises");
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).expect("parses");
        assert_eq!(value["scenario"], "publish");
        assert_eq!(value["messages"], 2000);
        assert_eq!(value["msgs_per_sec"], 4000.0);
        assert_eq!(value["mib_per_sec"], 3.91);
        assert_eq!(value["latency_us"]["p99"], 2.0);
        assert_eq!(value["nacked"], 0);
    }
}
