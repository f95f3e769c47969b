//! Domain types: input parsed once into values that are valid by construction. Nothing here knows
//! HTTP; parsing fails with `InputError`, which the API layer maps to a 400 in one place.

pub mod api_key;
pub mod chat;
pub mod consumer;
pub mod identifier;
pub mod input_error;
pub mod pricing;
pub mod session_id;
pub mod tokens;
pub mod usage;

pub use api_key::ApiKey;
pub use chat::{ChatBody, ChatMessage, ChatRequest, Role, UserIdentity};
pub use consumer::Consumer;
pub use input_error::InputError;
pub use usage::TokenUsage;
