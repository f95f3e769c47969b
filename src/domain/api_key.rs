//! An OpenAI key that cannot leak by accident: it has no `Display`, and its `Debug` shows only
//! the contract's 7-character prefix; the whole key is reachable only through `expose`, for the
//! `Authorization` header.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// `None` for a blank key. The value is trimmed.
    pub fn parse(raw: &str) -> Option<Self> {
        let key = raw.trim();
        (!key.is_empty()).then(|| Self(key.to_string()))
    }

    /// The whole key, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in characters (`openai_api_key_length`).
    pub fn len(&self) -> usize {
        self.0.chars().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// First 7 characters and `...`; `None` when the key has 7 or fewer (contract §5).
    pub fn prefix(&self) -> Option<String> {
        (self.len() > 7).then(|| format!("{}...", self.0.chars().take(7).collect::<String>()))
    }

    /// Replaces any occurrence of the key in `text` with its prefix (upstream messages
    /// sometimes echo what they were sent).
    pub fn redact(&self, text: &str) -> String {
        if self.0.len() < 4 || !text.contains(&self.0) {
            return text.to_string();
        }
        text.replace(&self.0, &self.prefix().unwrap_or_else(|| "***".into()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ApiKey({})",
            self.prefix().unwrap_or_else(|| "***".into())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_seven_characters_or_none() {
        assert_eq!(
            ApiKey::parse("sk-abcdefgh").unwrap().prefix().as_deref(),
            Some("sk-abcd...")
        );
        assert_eq!(ApiKey::parse("sk-abcd").unwrap().prefix(), None);
        assert!(ApiKey::parse("  ").is_none());
    }

    #[test]
    fn debug_and_redact_never_show_the_whole_key() {
        let key = ApiKey::parse("sk-secret-1234567890").unwrap();
        assert!(!format!("{key:?}").contains("1234567890"));
        assert_eq!(
            key.redact("bad key sk-secret-1234567890!"),
            "bad key sk-secr...!"
        );
    }
}
