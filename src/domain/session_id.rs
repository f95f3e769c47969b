//! Session ids as clients send them (contract §6, §7; 2026-11 amendment).
//!
//! The website's JavaScript sends `"null"` or `"undefined"` when its variable is unset, and
//! curl users send blanks; all of these mean "no session", never a session by that name.

use crate::domain::error::InputError;

/// The header that names a chat's session; it wins over the body's `sessionId`.
pub const SESSION_HEADER: &str = "X-Session-ID";

/// A client-supplied id, trimmed; `None` when it is blank, `null` or `undefined`.
pub fn client_session_id(raw: Option<&str>) -> Option<String> {
    let id = raw?.trim();
    let absent = id.is_empty() || id == "null" || id == "undefined";
    (!absent).then(|| id.to_string())
}

/// The `X-Session-ID` header's raw bytes. Bytes that are not UTF-8, or text with control
/// characters, are refused: silently ignoring them would count the chat under whichever
/// session started last, someone else's.
pub fn header_session_id(raw: Option<&[u8]>) -> Result<Option<String>, InputError> {
    let Some(bytes) = raw else { return Ok(None) };
    let text = std::str::from_utf8(bytes).map_err(|_| InputError::UnreadableSessionHeader)?;
    if text.chars().any(char::is_control) {
        return Err(InputError::UnreadableSessionHeader);
    }
    crate::domain::identifier::check_identifier(SESSION_HEADER, text)?;
    Ok(client_session_id(Some(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_null_and_undefined_mean_no_session() {
        for raw in ["", "  ", "null", "undefined", " null "] {
            assert_eq!(client_session_id(Some(raw)), None, "{raw:?}");
        }
        assert_eq!(client_session_id(None), None);
        assert_eq!(
            client_session_id(Some(" session_1 ")).as_deref(),
            Some("session_1")
        );
        assert_eq!(client_session_id(Some("Null")).as_deref(), Some("Null"));
    }

    #[test]
    fn headers_must_be_visible_utf8_text() {
        assert!(header_session_id(Some(b"\xff\xfe")).is_err());
        assert!(header_session_id(Some(b"a\tb")).is_err());
        assert_eq!(
            header_session_id(Some("sesión_1".as_bytes())).unwrap(),
            Some("sesión_1".to_string())
        );
        assert_eq!(header_session_id(Some(b"undefined")).unwrap(), None);
        assert_eq!(header_session_id(None).unwrap(), None);
    }
}
