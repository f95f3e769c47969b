//! `POST /api/chat` input: the body as the chat window sends it, and the validated request
//! the chat service works with (contract §6).

use serde::Deserialize;

use crate::domain::identifier::check_optional;
use crate::domain::input_error::InputError;
use crate::domain::session_id::{SessionHeader, client_session_id, header_session_id};

/// The request body. Unknown fields are ignored; `null` counts as absent. Every field is
/// optional, but a message or a file is required. (Also its OpenAPI schema: what is parsed is
/// what is documented.)
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ChatBody {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub history: Option<Vec<HistoryItem>>,
    #[serde(default)]
    pub attached_files: Option<Vec<AttachedFile>>,
    #[serde(default)]
    pub attached_content: Option<String>,
    #[serde(default)]
    pub attached_filename: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default, rename = "isGuest")]
    pub is_guest: Option<bool>,
    #[serde(default, rename = "sessionId")]
    pub session_id: Option<String>,
    /// `true`: server-sent events (`delta` events, then one `done` or `error`).
    #[serde(default)]
    pub stream: Option<bool>,
}

/// One earlier turn; extra fields (timestamps, ids) are dropped.
#[derive(Debug, Clone, utoipa::ToSchema)]
pub struct HistoryItem {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Default, utoipa::ToSchema)]
pub struct AttachedFile {
    pub name: Option<String>,
    pub content: Option<String>,
}

#[derive(Deserialize)]
struct HistoryFields {
    role: Role,
    content: String,
}

#[derive(Deserialize)]
struct FileFields {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    content: Option<String>,
}

/// Items must be JSON objects: serde would also read a struct from an array (`[role, content]`),
/// which the contract never allowed and the fuzzer found.
fn object_only<'de, D, T>(deserializer: D, expecting: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectOnly<T>(&'static str, std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(ObjectOnly(expecting, std::marker::PhantomData))
}

impl<'de> Deserialize<'de> for HistoryItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f: HistoryFields = object_only(d, "an object with role and content")?;
        Ok(Self {
            role: f.role,
            content: f.content,
        })
    }
}

impl<'de> Deserialize<'de> for AttachedFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f: FileFields = object_only(d, "an object with name and content")?;
        Ok(Self {
            name: f.name,
            content: f.content,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// Who is chatting (for the Papita usage record, the quotas and the consumers' table): as the
/// body claims, or as the site's token proves (`AUTH_JWT_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    pub username: String,
    pub is_guest: bool,
    /// Proven by the site's token (`AUTH_JWT_*`), not just claimed by the body.
    pub verified: bool,
}

/// A chat request that is valid: at least one message, a model, a user.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// History, then the composed user message (last).
    pub messages: Vec<ChatMessage>,
    pub model: String,
    pub user: UserIdentity,
    /// From the session header, else `sessionId`; the service falls back to the current session.
    pub session_id: Option<String>,
    pub stream: bool,
    /// Characters of input, by part (for `MAX_INPUT_CHARS` and budget estimates).
    pub size: InputSize,
    /// All of them: what is sent upstream.
    pub input_chars: usize,
    /// The client's address as rate limits key it (an IPv6 client by its network), set by the
    /// HTTP layer: what a guest's and an address's quota count against.
    pub client: Option<std::net::IpAddr>,
}

/// How many characters each part of a chat's input has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputSize {
    pub message: usize,
    pub history: usize,
    pub attachments: usize,
}

impl ChatRequest {
    /// `MAX_INPUT_CHARS` on message + history + attachments (413 past it), naming the largest
    /// part so the user knows what to shorten.
    pub fn check_size(&self, limit: usize) -> Result<(), InputError> {
        if self.input_chars <= limit {
            return Ok(());
        }
        let InputSize {
            message,
            history,
            attachments,
        } = self.size;
        let part = if attachments >= message && attachments >= history {
            "the attached files"
        } else if history >= message {
            "the history"
        } else {
            "the message"
        };
        Err(InputError::TooLarge {
            part,
            chars: self.input_chars,
            limit,
        })
    }
}

impl ChatRequest {
    pub fn parse(
        body: ChatBody,
        session_header: Option<SessionHeader>,
        default_model: &str,
    ) -> Result<Self, InputError> {
        // A bad header is refused before anything else is looked at, then the identifiers: they
        // are kept and written everywhere, so they have a size (`identifier.rs`).
        let header_session = header_session_id(session_header)?;
        check_optional("sessionId", body.session_id.as_deref())?;
        check_optional("username", body.username.as_deref())?;
        check_optional("model", body.model.as_deref())?;
        let message = body.message.unwrap_or_default();
        let files = match body.attached_files {
            Some(files) if !files.is_empty() => files,
            // Legacy single-file fields, used when `attached_files` is empty or missing.
            _ => match body.attached_content.filter(|c| !c.is_empty()) {
                Some(content) => vec![AttachedFile {
                    name: body.attached_filename,
                    content: Some(content),
                }],
                None => Vec::new(),
            },
        };
        if message.trim().is_empty() && files.is_empty() {
            return Err(InputError::MessageRequired);
        }

        let size = InputSize {
            message: message.chars().count(),
            history: body
                .history
                .iter()
                .flatten()
                .map(|h| h.content.chars().count())
                .sum(),
            attachments: files
                .iter()
                .map(|f| {
                    f.content.as_deref().map_or(0, |c| c.chars().count())
                        + f.name.as_deref().map_or(0, |n| n.chars().count())
                })
                .sum(),
        };
        let mut messages: Vec<ChatMessage> = body
            .history
            .unwrap_or_default()
            .into_iter()
            .map(|item| ChatMessage {
                role: item.role,
                content: item.content,
            })
            .collect();
        messages.push(ChatMessage {
            role: Role::User,
            content: compose_user_message(&message, &files),
        });

        let model = non_blank(body.model).unwrap_or_else(|| default_model.to_string());
        let user = match non_blank(body.username) {
            Some(name) if name != "guest" => UserIdentity {
                username: name,
                is_guest: body.is_guest.unwrap_or(true),
                verified: false,
            },
            _ => UserIdentity {
                username: "guest".into(),
                is_guest: true,
                verified: false,
            },
        };
        let session_id = header_session.or_else(|| client_session_id(body.session_id.as_deref()));
        let input_chars = messages.iter().map(|m| m.content.chars().count()).sum();
        Ok(Self {
            messages,
            model,
            user,
            session_id,
            stream: body.stream.unwrap_or(false),
            size,
            input_chars,
            client: None,
        })
    }
}

/// The user message sent upstream (contract §6): files first, each headed
/// `[Attached file i: name]`, separated by `---`, then the message or a default prompt.
pub fn compose_user_message(message: &str, files: &[AttachedFile]) -> String {
    if files.is_empty() {
        return message.to_string();
    }
    let parts: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let name = file
                .name
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or("file");
            format!(
                "[Attached file {}: {}]\n\n{}",
                i + 1,
                name,
                file.content.as_deref().unwrap_or("")
            )
        })
        .collect();
    let prompt = if !message.trim().is_empty() {
        message
    } else if files.len() > 1 {
        "Please compare and analyze the attached files."
    } else {
        "Please analyze the attached file."
    };
    format!("{}\n\n---\n\n{}", parts.join("\n\n---\n\n"), prompt)
}

fn non_blank(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, content: &str) -> AttachedFile {
        AttachedFile {
            name: Some(name.into()),
            content: Some(content.into()),
        }
    }

    fn parse(json: serde_json::Value) -> Result<ChatRequest, InputError> {
        ChatRequest::parse(serde_json::from_value(json).unwrap(), None, "gpt-3.5-turbo")
    }

    #[test]
    fn message_without_files_is_sent_as_is() {
        assert_eq!(compose_user_message("Hi", &[]), "Hi");
    }

    #[test]
    fn one_file_and_no_message_asks_to_analyze_it() {
        assert_eq!(
            compose_user_message("", &[file("a.txt", "A")]),
            "[Attached file 1: a.txt]\n\nA\n\n---\n\nPlease analyze the attached file."
        );
    }

    #[test]
    fn several_files_are_joined_then_the_message() {
        assert_eq!(
            compose_user_message("Diff?", &[file("a", "A"), AttachedFile::default()]),
            "[Attached file 1: a]\n\nA\n\n---\n\n[Attached file 2: file]\n\n\n\n---\n\nDiff?"
        );
        assert!(
            compose_user_message("", &[file("a", "A"), file("b", "B")])
                .ends_with("Please compare and analyze the attached files.")
        );
    }

    #[test]
    fn legacy_attachment_fields_make_one_file() {
        let req =
            parse(serde_json::json!({"attached_content": "X", "attached_files": []})).unwrap();
        assert_eq!(
            req.messages[0].content,
            "[Attached file 1: file]\n\nX\n\n---\n\nPlease analyze the attached file."
        );
    }

    #[test]
    fn nothing_to_send_is_rejected() {
        let err = parse(serde_json::json!({"message": "  "})).unwrap_err();
        assert_eq!(err, InputError::MessageRequired);
        assert_eq!(
            err.to_string(),
            crate::domain::input_error::MESSAGE_REQUIRED
        );
    }

    #[test]
    fn past_max_input_chars_the_largest_part_is_named() {
        let req = parse(serde_json::json!({"message": "hi",
            "history": [{"role": "user", "content": "x".repeat(50)}],
            "attached_files": [{"name": "a", "content": "y".repeat(10)}]}))
        .unwrap();
        assert!(req.check_size(1000).is_ok());
        let err = req.check_size(40).unwrap_err();
        assert!(
            matches!(
                err,
                InputError::TooLarge {
                    part: "the history",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("MAX_INPUT_CHARS"));
    }

    #[test]
    fn list_items_must_be_objects() {
        for body in [
            serde_json::json!({"message": "m", "attached_files": [[null, null]]}),
            serde_json::json!({"message": "m", "history": [["user", "hi"]]}),
        ] {
            assert!(
                serde_json::from_value::<ChatBody>(body.clone()).is_err(),
                "{body}"
            );
        }
        let ok = serde_json::json!({"message": "m", "history": [{"role": "user", "content": "x", "id": 3}],
            "attached_files": [{"name": "a", "content": "b"}]});
        assert!(serde_json::from_value::<ChatBody>(ok).is_ok());
    }

    #[test]
    fn guest_rules() {
        let req = parse(serde_json::json!({"message": "m", "username": "guest", "isGuest": false}))
            .unwrap();
        assert_eq!(
            req.user,
            UserIdentity {
                username: "guest".into(),
                is_guest: true,
                verified: false,
            }
        );
        let req = parse(serde_json::json!({"message": "m", "username": "ana", "isGuest": false}))
            .unwrap();
        assert_eq!(
            req.user,
            UserIdentity {
                username: "ana".into(),
                is_guest: false,
                verified: false,
            }
        );
        let req = parse(serde_json::json!({"message": "m", "username": "ana"})).unwrap();
        assert!(req.user.is_guest);
    }

    fn header(value: &'static [u8]) -> Option<SessionHeader<'static>> {
        Some(SessionHeader {
            name: "X-Session-ID",
            value,
        })
    }

    #[test]
    fn header_session_id_wins() {
        let body =
            serde_json::from_value(serde_json::json!({"message": "m", "sessionId": "b"})).unwrap();
        let req = ChatRequest::parse(body, header(b"a"), "m").unwrap();
        assert_eq!(req.session_id.as_deref(), Some("a"));
    }

    #[test]
    fn a_null_header_does_not_override_the_body() {
        let body =
            serde_json::from_value(serde_json::json!({"message": "m", "sessionId": "b"})).unwrap();
        let req = ChatRequest::parse(body, header(b"null"), "m").unwrap();
        assert_eq!(req.session_id.as_deref(), Some("b"));
        let body =
            serde_json::from_value(serde_json::json!({"message": "m", "sessionId": "undefined"}))
                .unwrap();
        let req = ChatRequest::parse(body, None, "m").unwrap();
        assert_eq!(req.session_id, None);
    }
}
