//! The price table: one data file (built in, or `PRICING_FILE`), loaded and checked at start-up.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

const BUILT_IN: &str = include_str!("pricing.json");

/// USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
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
        if let Some((model, _)) = file
            .models
            .iter()
            .find(|(_, p)| !(p.input >= 0.0 && p.output >= 0.0))
        {
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

    /// Exact name, else the longest known name followed by `-` (dated snapshots), else fallback.
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

    /// Cost in USD of the given token counts: (prompt, completion).
    pub fn cost(
        &self,
        model: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> (f64, f64, bool) {
        let quote = self.quote(model);
        (
            prompt_tokens as f64 * quote.price.input / 1_000_000.0,
            completion_tokens as f64 * quote.price.output / 1_000_000.0,
            quote.priced,
        )
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
