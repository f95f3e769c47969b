//! The session log's four kinds of line (contract §10). Field order here is the key order in
//! the files, which existing grep patterns and tooling rely on.

use chrono::{DateTime, Local};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::Line;
use crate::clock::{date, timestamp};
use crate::domain::{TokenUsage, UserIdentity};

#[derive(Serialize)]
struct ProjectInit {
    event: &'static str,
    timestamp: String,
    date: String,
    project_criteria: Value,
}

#[derive(Serialize)]
struct SessionStart<'a> {
    event: &'static str,
    session_id: &'a str,
    timestamp: String,
    date: String,
    /// Only with a verified identity (`AUTH_JWT_*`): who started it, as the site's token says.
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_guest: Option<bool>,
}

#[derive(Serialize)]
struct SessionStop<'a> {
    event: &'static str,
    session_id: &'a str,
    timestamp: String,
    date: String,
    duration_seconds: Option<f64>,
    metrics: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct Metric<'a, V: Serialize> {
    event: &'static str,
    session_id: &'a str,
    metric_name: &'a str,
    metric_value: V,
    timestamp: String,
    date: String,
}

/// `chat_usage`'s value: a struct rather than a `json!` map, since one is built per chat.
#[derive(Serialize)]
struct ChatUsage<'a> {
    model: &'a str,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    /// Only when history turns were dropped to fit the model's window (`HISTORY_TRIM`).
    #[serde(skip_serializing_if = "is_zero")]
    history_trimmed: usize,
    /// Only with a verified identity (`AUTH_JWT_*`): who chatted, as the site's token says.
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_guest: Option<bool>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Written once at start-up: what wrote these files and by which rules.
pub fn project_init(at: &DateTime<Local>) -> Line {
    let criteria = json!({
        "name": "AL-Chat",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": "rust (axum, tokio)",
        "log_rules": {
            "format": "one JSON object per line, UTF-8",
            "file": "session_YYYY-MM-DD.log by the local date of each line's timestamp",
            "events": ["project_init", "session_start", "session_stop", "metric"],
            "durability": "session_start and session_stop are fsync'd before the API answers",
        },
    });
    Line::new(
        date(at),
        &ProjectInit {
            event: "project_init",
            timestamp: timestamp(at),
            date: date(at),
            project_criteria: criteria,
        },
    )
}

/// `verified`: the site's token's user (`AUTH_JWT_*`), written only then.
pub fn session_start(
    session_id: &str,
    verified: Option<&UserIdentity>,
    at: &DateTime<Local>,
) -> Line {
    Line::new(
        date(at),
        &SessionStart {
            event: "session_start",
            session_id,
            timestamp: timestamp(at),
            date: date(at),
            username: verified.map(|u| u.username.as_str()),
            is_guest: verified.map(|u| u.is_guest),
        },
    )
}

pub fn session_stop(
    session_id: &str,
    at: &DateTime<Local>,
    duration_seconds: Option<f64>,
    metrics: &Map<String, Value>,
) -> Line {
    Line::new(
        date(at),
        &SessionStop {
            event: "session_stop",
            session_id,
            timestamp: timestamp(at),
            date: date(at),
            duration_seconds,
            metrics,
        },
    )
}

/// The `chat_usage` metric after a successful chat.
pub fn chat_usage(
    session_id: &str,
    model: &str,
    usage: &TokenUsage,
    history_trimmed: usize,
    user: &UserIdentity,
    at: &DateTime<Local>,
) -> Line {
    let verified = user.verified;
    let value = ChatUsage {
        model,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.total_tokens,
        history_trimmed,
        username: verified.then_some(user.username.as_str()),
        is_guest: verified.then_some(user.is_guest),
    };
    Line::new(
        date(at),
        &Metric {
            event: "metric",
            session_id,
            metric_name: "chat_usage",
            metric_value: value,
            timestamp: timestamp(at),
            date: date(at),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn stop_line_has_the_contract_key_order() {
        let at = Local.with_ymd_and_hms(2026, 11, 23, 14, 5, 9).unwrap();
        let mut metrics = Map::new();
        metrics.insert("messages".into(), json!(3));
        let line = session_stop("session_20261123_140500", &at, Some(9.5), &metrics);
        assert_eq!(line.date, "2026-11-23");
        assert_eq!(
            String::from_utf8(line.bytes).unwrap(),
            "{\"event\": \"session_stop\", \"session_id\": \"session_20261123_140500\", \"timestamp\": \"2026-11-23T14:05:09.000000\", \"date\": \"2026-11-23\", \"duration_seconds\": 9.5, \"metrics\": {\"messages\": 3}}\n"
        );
    }
}
