//! The price table: one data file (built in, or `PRICING_FILE`), loaded and checked at start-up.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::domain::tokens::Tokenizer;

const BUILT_IN: &str = include_str!("pricing.json");

/// USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Prompt tokens OpenAI served from its cache (`prompt_tokens_details.cached_tokens`);
    /// without it they cost the normal input rate.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// The model's context window in tokens (prompt and answer together), when known.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// How its text becomes tokens; absent: by the model's family (`domain::tokens`).
    #[serde(default)]
    pub tokenizer: Option<Tokenizer>,
}

/// What one chat cost, in USD.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cost {
    pub prompt: f64,
    pub completion: f64,
    /// False when the model was priced at the fallback rate.
    pub priced: bool,
}

#[derive(Debug, Deserialize)]
struct PricingFile {
    fallback: String,
    models: HashMap<String, Price>,
}

#[derive(Debug, Clone)]
pub struct PriceTable {
    models: HashMap<String, Price>,
    fallback: Price,
}

/// A model's price and whether the table really knew the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quote {
    pub price: Price,
    pub priced: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid price table {source_name}: {reason}")]
pub struct PricingError {
    source_name: String,
    reason: String,
}

impl PricingError {
    /// What is wrong, without the file's name (the caller names the setting).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl PriceTable {
    /// The built-in table, or the operator's file.
    pub fn load(file: Option<&Path>) -> Result<Self, PricingError> {
        match file {
            None => Self::parse(BUILT_IN, "(built in)"),
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| PricingError {
                    source_name: name.clone(),
                    reason: e.to_string(),
                })?;
                Self::parse(&text, &name)
            }
        }
    }

    fn parse(text: &str, name: &str) -> Result<Self, PricingError> {
        let err = |reason: String| PricingError {
            source_name: name.to_string(),
            reason,
        };
        let file: PricingFile = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        if let Some((model, _)) = file.models.iter().find(|(_, p)| {
            !(p.input >= 0.0 && p.output >= 0.0 && p.cached_input.is_none_or(|c| c >= 0.0))
        }) {
            return Err(err(format!(
                "model {model:?} has a negative or missing price"
            )));
        }
        let fallback = *file.models.get(&file.fallback).ok_or_else(|| {
            err(format!(
                "fallback model {:?} is not in \"models\"",
                file.fallback
            ))
        })?;
        Ok(Self {
            models: file.models,
            fallback,
        })
    }

    /// The models the table prices by name.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.keys().cloned().collect();
        names.sort();
        names
    }

    /// The most specific entry: the exact name, else the longest known name followed by `-`
    /// (dated snapshots and variants: `gpt-4o-mini-2024-07-18` is `gpt-4o-mini`, never `gpt-4o`),
    /// else the fallback, flagged unpriced.
    pub fn quote(&self, model: &str) -> Quote {
        if let Some(price) = self.models.get(model) {
            return Quote {
                price: *price,
                priced: true,
            };
        }
        let best = self
            .models
            .iter()
            .filter(|(name, _)| {
                model.len() > name.len()
                    && model.starts_with(name.as_str())
                    && model.as_bytes()[name.len()] == b'-'
            })
            .max_by_key(|(name, _)| name.len());
        match best {
            Some((_, price)) => Quote {
                price: *price,
                priced: true,
            },
            None => Quote {
                price: self.fallback,
                priced: false,
            },
        }
    }

    /// The model's tokenizer: the table's word for it, else its family's.
    pub fn tokenizer(&self, model: &str) -> Tokenizer {
        let quote = self.quote(model);
        match quote.price.tokenizer {
            Some(named) if quote.priced => named,
            _ => Tokenizer::for_model(model),
        }
    }

    /// The model's context window, when the table gives one.
    pub fn context_window(&self, model: &str) -> Option<u64> {
        let quote = self.quote(model);
        quote.priced.then_some(quote.price.context_window).flatten()
    }

    /// Cost in USD of one chat's tokens; `cached` of the prompt tokens at the cached rate.
    pub fn cost(&self, model: &str, prompt: u64, cached: u64, completion: u64) -> Cost {
        let quote = self.quote(model);
        let price = quote.price;
        let cached = cached.min(prompt);
        let per_token = |rate: f64| rate / 1_000_000.0;
        Cost {
            prompt: (prompt - cached) as f64 * per_token(price.input)
                + cached as f64 * per_token(price.cached_input.unwrap_or(price.input)),
            completion: completion as f64 * per_token(price.output),
            priced: quote.priced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_table_loads_and_knows_the_families() {
        let t = PriceTable::load(None).unwrap();
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "o3-mini",
            "o1",
            "gpt-3.5-turbo",
            "gpt-4",
            "gpt-4-turbo",
        ] {
            assert!(t.quote(m).priced, "{m}");
        }
    }

    #[test]
    fn snapshots_take_the_longest_matching_family() {
        let t = PriceTable::load(None).unwrap();
        assert_eq!(
            t.quote("gpt-4o-mini-2024-07-18").price,
            t.quote("gpt-4o-mini").price
        );
        assert_eq!(t.quote("gpt-4o-2024-08-06").price, t.quote("gpt-4o").price);
        assert_eq!(t.quote("gpt-4-0613").price, t.quote("gpt-4").price);
        assert!(!t.quote("gpt-4oo").priced);
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let t = PriceTable::load(None).unwrap();
        let price = |m: &str| t.quote(m).price.input;
        assert_eq!(price("gpt-4o-mini"), 0.15);
        assert_eq!(
            price("gpt-4o-mini-2024-07-18"),
            0.15,
            "a variant, not its family"
        );
        assert_eq!(price("gpt-4o-2024-05-13"), 5.0, "an exact snapshot entry");
        assert_eq!(price("gpt-4o-2024-08-06"), 2.5);
        assert_eq!(price("gpt-4.1-nano"), 0.1);
        assert_eq!(price("gpt-4.1-nano-2025-04-14"), 0.1);
    }

    #[test]
    fn cached_prompt_tokens_cost_the_cached_rate_where_there_is_one() {
        let t = PriceTable::load(None).unwrap();
        // gpt-4o: input 2.5, cached 1.25 per 1M.
        let c = t.cost("gpt-4o", 1_000_000, 400_000, 0);
        assert!((c.prompt - (0.6 * 2.5 + 0.4 * 1.25)).abs() < 1e-9, "{c:?}");
        // gpt-4o-2024-05-13 has no cached rate: everything at the input rate.
        let c = t.cost("gpt-4o-2024-05-13", 1_000_000, 400_000, 0);
        assert!((c.prompt - 5.0).abs() < 1e-9, "{c:?}");
        // More cached than prompt (a confused server) never goes negative.
        assert!(t.cost("gpt-4o", 10, 50, 0).prompt >= 0.0);
    }

    #[test]
    fn unknown_models_use_the_fallback_and_are_flagged() {
        let t = PriceTable::load(None).unwrap();
        let q = t.quote("llama3");
        assert!(!q.priced);
        assert_eq!(q.price, t.quote("gpt-3.5-turbo").price);
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(PriceTable::parse("{", "x").is_err());
        assert!(PriceTable::parse(r#"{"fallback":"a","models":{}}"#, "x").is_err());
        assert!(
            PriceTable::parse(
                r#"{"fallback":"a","models":{"a":{"input":-1,"output":1}}}"#,
                "x"
            )
            .is_err()
        );
    }
}
