//! The model allow-list (`OPENAI_ALLOWED_MODELS`): names or `prefix*` patterns; `*` allows any.

/// Which models a chat may ask for.
#[derive(Debug, Clone)]
pub struct ModelPolicy {
    /// `None`: any model.
    patterns: Option<Vec<String>>,
}

impl ModelPolicy {
    /// `setting`: the comma-separated list, or `None` for the default (`default_model` plus
    /// every model in the price table).
    pub fn new(setting: Option<&str>, default_model: &str, priced: &[String]) -> Self {
        let patterns: Vec<String> = match setting {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
            // The price table's models and their dated variants (`gpt-4o-2024-08-06`), which the
            // table prices as their family.
            None => {
                let mut all = vec![default_model.to_string()];
                for model in priced {
                    all.push(model.clone());
                    all.push(format!("{model}-*"));
                }
                all
            }
        };
        if patterns.iter().any(|p| p == "*") {
            return Self { patterns: None };
        }
        Self {
            patterns: Some(patterns),
        }
    }

    pub fn allows(&self, model: &str) -> bool {
        match &self.patterns {
            None => true,
            Some(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => p == model,
            }),
        }
    }

    /// Whether any model name is allowed (`*`).
    pub fn any(&self) -> bool {
        self.patterns.is_none()
    }

    /// The whole names in the list (not the `prefix*` patterns).
    pub fn names(&self) -> Vec<String> {
        self.patterns
            .iter()
            .flatten()
            .filter(|p| !p.ends_with('*'))
            .cloned()
            .collect()
    }

    /// The list as the refusal names it (sorted, at most 20 shown).
    pub fn describe(&self) -> String {
        match &self.patterns {
            None => "*".into(),
            Some(patterns) => {
                let mut sorted = patterns.clone();
                sorted.sort();
                sorted.dedup();
                let more = sorted.len().saturating_sub(20);
                let mut shown = sorted.into_iter().take(20).collect::<Vec<_>>().join(", ");
                if more > 0 {
                    shown.push_str(&format!(" (and {more} more)"));
                }
                shown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_prefixes_and_the_default() {
        let p = ModelPolicy::new(Some("gpt-4o-mini, o3*"), "gpt-3.5-turbo", &[]);
        assert!(p.allows("gpt-4o-mini") && p.allows("o3-mini"));
        assert!(!p.allows("gpt-4o") && !p.allows("gpt-3.5-turbo"));
        let d = ModelPolicy::new(None, "my-local", &["gpt-4o".into()]);
        assert!(d.allows("my-local") && d.allows("gpt-4o") && d.allows("gpt-4o-2024-08-06"));
        assert!(!d.allows("o1-pro") && !d.allows("gpt-4oo"));
        assert!(ModelPolicy::new(Some("*"), "x", &[]).allows("anything"));
    }
}
