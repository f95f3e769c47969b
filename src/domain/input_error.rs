//! Why a client's input is not a valid request: the domain's own error, free of HTTP. The one
//! `From` into the API error (`crate::http::error`) makes each of these a 400.

pub const MESSAGE_REQUIRED: &str = "Message or attachment is required";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// No message and no file (contract §6).
    #[error("{MESSAGE_REQUIRED}")]
    MessageRequired,
    /// A session header that is not visible UTF-8 text.
    #[error(
        "Header {header} must be visible text (UTF-8, no control characters); send the session_id that /api/session/start returned, or leave the header out."
    )]
    UnreadableSessionHeader { header: &'static str },
    /// A session id, user name or model name that is too long or holds control characters.
    #[error("Field '{field}' {problem}.")]
    BadIdentifier {
        field: &'static str,
        problem: String,
    },
    /// Past `MAX_INPUT_CHARS` (a 413).
    #[error(
        "The chat is too large: {chars} characters of message, history and attachments, over the limit of {limit} (MAX_INPUT_CHARS). Most of it is {part}: shorten it or send less."
    )]
    TooLarge {
        part: &'static str,
        chars: usize,
        limit: usize,
    },
}
