//! Domain types: input parsed once into values that are valid by construction.

pub mod api_key;
pub mod chat;
pub mod session_id;

pub use api_key::ApiKey;
pub use chat::{ChatBody, ChatMessage, ChatRequest, Role, UserIdentity};
