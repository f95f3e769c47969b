//! Token counts of one chat, as the upstream reported them.

/// What one chat used; the unit every bookkeeping step (statistics, Papita, the log) takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt tokens, those served from OpenAI's prompt cache (billed at a lower rate).
    pub cached_tokens: u64,
}
