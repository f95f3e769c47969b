//! Session ids as clients send them (contract §6, §7; 2026-11 amendment).
//!
//! The website's JavaScript sends `"null"` or `"undefined"` when its variable is unset, and
//! curl users send blanks; all of these mean "no session", never a session by that name.

use crate::domain::input_error::InputError;

/// A session id that came in a header: the header's name (the HTTP layer knows it) and its raw
/// bytes. It wins over the body's `sessionId`.
#[derive(Debug, Clone, Copy)]
pub struct SessionHeader<'a> {
    pub name: &'static str,
    pub value: &'a [u8],
}

/// A client-supplied id, trimmed; `None` when it is blank, `null` or `undefined`.
pub fn client_session_id(raw: Option<&str>) -> Option<String> {
    let id = raw?.trim();
    let absent = id.is_empty() || id == "null" || id == "undefined";
    (!absent).then(|| id.to_string())
}

/// The session header's raw bytes. Bytes that are not UTF-8, or text with control characters,
/// are refused: silently ignoring them would count the chat under whichever session started
/// last, someone else's.
pub fn header_session_id(raw: Option<SessionHeader>) -> Result<Option<String>, InputError> {
    let Some(SessionHeader { name, value }) = raw else {
        return Ok(None);
    };
    let unreadable = InputError::UnreadableSessionHeader { header: name };
    let text = std::str::from_utf8(value).map_err(|_| unreadable.clone())?;
    if text.chars().any(char::is_control) {
        return Err(unreadable);
    }
    crate::domain::identifier::check_identifier(name, text)?;
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
        let header = |value: &'static [u8]| {
            Some(SessionHeader {
                name: "X-Session-ID",
                value,
            })
        };
        assert!(header_session_id(header(b"\xff\xfe")).is_err());
        assert!(header_session_id(header(b"a\tb")).is_err());
        assert_eq!(
            header_session_id(header("sesión_1".as_bytes())).unwrap(),
            Some("sesión_1".to_string())
        );
        assert_eq!(header_session_id(header(b"undefined")).unwrap(), None);
        assert_eq!(header_session_id(None).unwrap(), None);
    }
}
