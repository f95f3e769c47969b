//! A log line, serialized exactly as the Flask service's `json.dumps` wrote it.

use std::io::{self, Write};

use serde::Serialize;

/// A finished log line for the file of `date` (`YYYY-MM-DD`, the line's own timestamp date).
#[derive(Debug)]
pub struct Line {
    pub date: String,
    pub bytes: Vec<u8>,
}

impl Line {
    /// Serializes `entry` as the Flask service did (`json.dumps(..., ensure_ascii=False)`):
    /// `", "` and `": "` separators, non-ASCII as is, keys in declaration order.
    pub fn new<T: Serialize>(date: String, entry: &T) -> Self {
        let mut bytes = Vec::with_capacity(160);
        let mut ser = serde_json::Serializer::with_formatter(&mut bytes, PythonFormatter);
        entry
            .serialize(&mut ser)
            .expect("log entries always serialize");
        bytes.push(b'\n');
        Self { date, bytes }
    }
}

/// `", "` before every array element and object key but the first.
fn separator<W: ?Sized + Write>(writer: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// `serde_json` formatting with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        separator(w, first)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        separator(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Sample<'a> {
        event: &'a str,
        n: f64,
        list: Vec<u8>,
        nested: serde_json::Value,
    }

    #[test]
    fn lines_are_formatted_like_pythons_json_dumps() {
        let line = Line::new(
            "2026-11-23".into(),
            &Sample {
                event: "café",
                n: 1.5,
                list: vec![1, 2],
                nested: serde_json::json!({"b": 1, "a": "x"}),
            },
        );
        assert_eq!(
            String::from_utf8(line.bytes).unwrap(),
            "{\"event\": \"café\", \"n\": 1.5, \"list\": [1, 2], \"nested\": {\"b\": 1, \"a\": \"x\"}}\n"
        );
    }
}
