//! Identifiers a client names things by: the session id (body `sessionId` / `session_id`, header
//! `X-Session-ID`), `username` and `model`. Each is kept in memory (ledgers, sessions), written
//! into every `chat_usage` line and Papita record, and shown in logs and metrics, so each has a
//! size: at most 128 bytes of text without control characters. The site sends ids the service
//! made (`session_YYYYMMDD_HHMMSS`), user names and model names, all far shorter.

use crate::domain::input_error::InputError;

/// The longest identifier accepted, in bytes of UTF-8.
pub const MAX_IDENTIFIER_BYTES: usize = 128;

/// `value` as the client sent it (before trimming): refused when too long or when it holds a
/// control character (a line break or an escape would forge log lines).
pub fn check_identifier(field: &'static str, value: &str) -> Result<(), InputError> {
    if value.len() > MAX_IDENTIFIER_BYTES {
        return Err(InputError::BadIdentifier {
            field,
            problem: format!(
                "is {} bytes long; at most {MAX_IDENTIFIER_BYTES} are accepted",
                value.len()
            ),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(InputError::BadIdentifier {
            field,
            problem: "holds a control character (line break, tab, escape…)".into(),
        });
    }
    Ok(())
}

/// `check_identifier` on an optional value.
pub fn check_optional(field: &'static str, value: Option<&str>) -> Result<(), InputError> {
    value.map_or(Ok(()), |v| check_identifier(field, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_have_a_size_and_no_control_characters() {
        assert!(check_identifier("model", &"a".repeat(128)).is_ok());
        assert!(check_identifier("model", &"ñ".repeat(64)).is_ok());
        let e = check_identifier("model", &"ñ".repeat(65)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Field 'model' is 130 bytes long; at most 128 are accepted."
        );
        for bad in ["x\n2026", "a\rb", "\u{1b}[31mred", "tab\there", "nul\0"] {
            let e = check_identifier("username", bad).unwrap_err().to_string();
            assert!(
                e.starts_with("Field 'username' holds a control character"),
                "{e}"
            );
        }
        assert!(check_optional("sessionId", None).is_ok());
    }
}
