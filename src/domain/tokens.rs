//! Counting prompt tokens before a call, as OpenAI will count them: the model's encoding
//! (tiktoken-rs: `o200k_base` for the gpt-4o / 4.1 / 5 / o-series families, `cl100k_base` for
//! gpt-3.5 / gpt-4) plus OpenAI's per-message overhead. A model no encoding covers is counted by
//! a documented upper bound: UTF-8 bytes (every token of a byte-level BPE covers at least one
//! byte).
//!
//! Cost: the encodings load on first need (a budget or a long conversation), never at start-up,
//! so a service without budgets never holds them. The site sends the whole history with every
//! chat, so each text's count is kept, keyed by a keyed hash of its encoding and bytes: a history
//! is counted once, then only hashed (two bounded generations, like the rate limiter's).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use tiktoken_rs::CoreBPE;

use crate::domain::ChatMessage;

/// Tokens OpenAI adds per message (`<|start|>`, the role, `<|end|>`-style framing), and once
/// to prime the reply: the figures of OpenAI's cookbook for every current chat model.
pub const PER_MESSAGE: u64 = 4;
pub const PER_REPLY: u64 = 3;

/// Counts kept per generation (two generations: at most twice this, ~16 bytes each).
const CACHE_PER_GENERATION: usize = 16 * 1024;

/// How a model's text becomes tokens. A price-table entry may name it (`"tokenizer"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenizer {
    O200kBase,
    Cl100kBase,
    /// No known encoding: UTF-8 bytes, an upper bound.
    Bytes,
}

static O200K_LOADED: AtomicBool = AtomicBool::new(false);
static CL100K_LOADED: AtomicBool = AtomicBool::new(false);

impl Tokenizer {
    /// The encoding of OpenAI's model families; `Bytes` for anything else.
    pub fn for_model(model: &str) -> Self {
        let family = |prefix: &str| {
            model == prefix
                || model
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with(['-', '.']))
        };
        if [
            "gpt-4o",
            "chatgpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
        ]
        .iter()
        .any(|p| family(p))
        {
            Self::O200kBase
        } else if ["gpt-3.5", "gpt-35", "gpt-4"].iter().any(|p| family(p)) {
            Self::Cl100kBase
        } else {
            Self::Bytes
        }
    }

    fn encoding(self) -> Option<&'static CoreBPE> {
        let (encoding, loaded) = match self {
            Self::O200kBase => (tiktoken_rs::o200k_base_singleton(), &O200K_LOADED),
            Self::Cl100kBase => (tiktoken_rs::cl100k_base_singleton(), &CL100K_LOADED),
            Self::Bytes => return None,
        };
        loaded.store(true, Ordering::Relaxed);
        Some(encoding)
    }

    /// Whether counting needs no encoding loaded first. The first use of an encoding builds it
    /// (tens of milliseconds in a release build, far longer in a debug one); done on an async
    /// worker, that stalls every request sharing the worker, long enough for a Redis call to
    /// time out and the shared state to be declared down.
    pub fn is_ready(self) -> bool {
        match self {
            Self::O200kBase => O200K_LOADED.load(Ordering::Relaxed),
            Self::Cl100kBase => CL100K_LOADED.load(Ordering::Relaxed),
            Self::Bytes => true,
        }
    }

    /// Tokens of `text`, uncached. Exact for prose; a run of more than `LONG_RUN` bytes
    /// without whitespace (base64, a pasted blob, "yyyy...") counts as its bytes plus one, an
    /// upper bound: BPE's merge is quadratic in a piece's length, and one 1 MB piece took
    /// seconds of CPU, which a client could ask for with every chat.
    pub fn count(self, text: &str) -> u64 {
        let Some(bpe) = self.encoding() else {
            return text.len() as u64;
        };
        if !text
            .split(char::is_whitespace)
            .any(|run| run.len() > LONG_RUN)
        {
            return bpe.encode_ordinary(text).len() as u64;
        }
        let mut rest = String::with_capacity(text.len().min(1 << 20));
        let mut bound = 0;
        for piece in text.split_inclusive(char::is_whitespace) {
            let run = piece.trim_end_matches(char::is_whitespace);
            if run.len() > LONG_RUN {
                bound += run.len() as u64 + 1;
                rest.push_str(&piece[run.len()..]);
            } else {
                rest.push_str(piece);
            }
        }
        bound + bpe.encode_ordinary(&rest).len() as u64
    }
}

/// Runs without whitespace longer than this are bounded by their bytes instead of encoded:
/// the encoding's cost is at most this many steps per byte of text.
pub const LONG_RUN: usize = 64;

/// Counts texts, keeping what it counted.
#[derive(Default)]
pub struct TokenCounter {
    hasher: foldhash::quality::RandomState,
    cache: Mutex<Generations>,
}

/// Keys are already keyed hashes: the maps need only a cheap hasher of their own.
type Counts = HashMap<u64, u32, foldhash::fast::RandomState>;

#[derive(Default)]
struct Generations {
    current: Counts,
    previous: Counts,
}

impl Generations {
    fn get(&mut self, key: u64) -> Option<u64> {
        if let Some(n) = self.current.get(&key) {
            return Some(u64::from(*n));
        }
        let n = self.previous.remove(&key)?;
        self.insert(key, u64::from(n));
        Some(u64::from(n))
    }

    fn insert(&mut self, key: u64, n: u64) {
        if self.current.len() >= CACHE_PER_GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current
            .insert(key, u32::try_from(n).unwrap_or(u32::MAX));
    }
}

impl TokenCounter {
    /// Tokens of `text` in `tokenizer`.
    pub fn count(&self, tokenizer: Tokenizer, text: &str) -> u64 {
        if tokenizer == Tokenizer::Bytes {
            return text.len() as u64;
        }
        let key = self.key(tokenizer, text);
        if let Some(n) = self.lock().get(key) {
            return n;
        }
        let n = tokenizer.count(text);
        self.lock().insert(key, n);
        n
    }

    /// A 64-bit keyed hash: a client cannot make two texts collide without the process's key.
    fn key(&self, tokenizer: Tokenizer, text: &str) -> u64 {
        self.hasher.hash_one((tokenizer, text))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each message's tokens with its overhead (`PER_MESSAGE`); the prompt is their sum plus
    /// `PER_REPLY`. The cache is looked at once for all of them, and written once for those it
    /// did not hold.
    pub fn per_message(&self, tokenizer: Tokenizer, messages: &[ChatMessage]) -> Vec<u64> {
        if tokenizer == Tokenizer::Bytes {
            return messages
                .iter()
                .map(|m| PER_MESSAGE + m.content.len() as u64)
                .collect();
        }
        let keys: Vec<u64> = messages
            .iter()
            .map(|m| self.key(tokenizer, &m.content))
            .collect();
        let mut counts: Vec<Option<u64>> = {
            let mut cache = self.lock();
            keys.iter().map(|key| cache.get(*key)).collect()
        };
        let mut counted = Vec::new();
        for ((count, message), key) in counts.iter_mut().zip(messages).zip(&keys) {
            if count.is_none() {
                let n = tokenizer.count(&message.content);
                *count = Some(n);
                counted.push((*key, n));
            }
        }
        if !counted.is_empty() {
            let mut cache = self.lock();
            for (key, n) in counted {
                cache.insert(key, n);
            }
        }
        counts
            .into_iter()
            .map(|n| PER_MESSAGE + n.unwrap_or(0))
            .collect()
    }
}

/// An upper bound of a prompt's tokens without counting: its bytes, plus the overheads.
pub fn prompt_upper_bound(messages: &[ChatMessage]) -> u64 {
    PER_REPLY
        + messages
            .iter()
            .map(|m| PER_MESSAGE + m.content.len() as u64)
            .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_take_their_family_encoding() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "gpt-5",
            "o1",
            "o3-mini",
            "o4-mini",
            "chatgpt-4o-latest",
        ] {
            assert_eq!(Tokenizer::for_model(m), Tokenizer::O200kBase, "{m}");
        }
        for m in ["gpt-3.5-turbo", "gpt-4", "gpt-4-turbo", "gpt-4-0613"] {
            assert_eq!(Tokenizer::for_model(m), Tokenizer::Cl100kBase, "{m}");
        }
        for m in ["llama3", "o10", "gpt-4oo", "claude-3"] {
            assert_eq!(Tokenizer::for_model(m), Tokenizer::Bytes, "{m}");
        }
    }

    /// Known counts, from OpenAI's reference Python `tiktoken` (0.12) on the same texts (and
    /// the cookbook's "tiktoken is great!" = 6 for cl100k_base).
    #[test]
    fn counts_match_known_values() {
        let cases: &[(Tokenizer, &str, u64)] = &[
            (Tokenizer::Cl100kBase, "tiktoken is great!", 6),
            (Tokenizer::Cl100kBase, "hello world", 2),
            (Tokenizer::Cl100kBase, "日本語のテキスト", 8),
            (Tokenizer::Cl100kBase, "emoji 🎉🎉🎉 and ✨", 13),
            (
                Tokenizer::Cl100kBase,
                "The quick brown fox jumps over the lazy dog.",
                10,
            ),
            (Tokenizer::O200kBase, "tiktoken is great!", 6),
            (Tokenizer::O200kBase, "hello world", 2),
            (Tokenizer::O200kBase, "日本語のテキスト", 6),
            (Tokenizer::O200kBase, "emoji 🎉🎉🎉 and ✨", 10),
            (
                Tokenizer::O200kBase,
                "The quick brown fox jumps over the lazy dog.",
                10,
            ),
            (Tokenizer::Bytes, "héllo", 6),
        ];
        for (tokenizer, text, want) in cases {
            assert_eq!(tokenizer.count(text), *want, "{tokenizer:?} {text:?}");
        }
    }

    #[test]
    fn the_cache_gives_the_same_counts() {
        let counter = TokenCounter::default();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let first = counter.count(Tokenizer::O200kBase, &text);
        assert_eq!(first, Tokenizer::O200kBase.count(&text));
        assert_eq!(counter.count(Tokenizer::O200kBase, &text), first);
        assert_eq!(
            counter.count(Tokenizer::Cl100kBase, &text),
            Tokenizer::Cl100kBase.count(&text),
            "the encoding is part of the key"
        );
        let messages: Vec<ChatMessage> = [text.as_str(), "short", text.as_str(), "new one here"]
            .iter()
            .map(|t| ChatMessage {
                role: crate::domain::Role::User,
                content: t.to_string(),
            })
            .collect();
        let each: Vec<u64> = messages
            .iter()
            .map(|m| PER_MESSAGE + Tokenizer::O200kBase.count(&m.content))
            .collect();
        assert_eq!(counter.per_message(Tokenizer::O200kBase, &messages), each);
        assert_eq!(
            counter.per_message(Tokenizer::O200kBase, &messages),
            each,
            "cached"
        );
    }

    #[test]
    fn long_runs_are_bounded_cheaply_and_never_undercounted() {
        let blob = "y".repeat(1_000_000);
        let counted = Tokenizer::Cl100kBase.count(&format!("see {blob} and {blob}"));
        assert!(counted >= 2_000_000, "at least its bytes: {counted}");
        // Prose is exact, runs below the limit too.
        let url = "https://example.com/a/path/that/is/not/so/long";
        assert_eq!(Tokenizer::O200kBase.count(url), {
            let bpe = tiktoken_rs::o200k_base_singleton();
            bpe.encode_ordinary(url).len() as u64
        });
        // A long run among prose: the prose exact, the run its bytes plus one.
        let base64 = "QUJD".repeat(100);
        let text = format!("the file is {base64} ok");
        let prose = Tokenizer::O200kBase.count("the file is  ok");
        assert_eq!(
            Tokenizer::O200kBase.count(&text),
            prose + base64.len() as u64 + 1
        );
        assert!(
            Tokenizer::O200kBase.count(&text) >= {
                let bpe = tiktoken_rs::o200k_base_singleton();
                bpe.encode_ordinary(&text).len() as u64
            }
        );
    }

    #[test]
    fn bytes_bound_every_encoding() {
        for text in [
            "日本語のテキスト",
            "emoji 🎉🎉🎉 and ✨",
            "a b c d e f",
            "ÿ",
        ] {
            for t in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
                assert!(t.count(text) <= text.len() as u64, "{t:?} {text}");
            }
        }
    }
}
