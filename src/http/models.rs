//! `GET /api/models`: the models a chat may ask for and their prices (the playground's model
//! picker and its cost per reply).

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use crate::state::AppState;
use utoipa_axum::{router::OpenApiRouter, routes};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(models))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelPrice {
    pub id: String,
    /// USD per million prompt tokens.
    pub input_usd_per_1m: f64,
    /// USD per million completion tokens.
    pub output_usd_per_1m: f64,
    /// False when the price table does not know it (priced at the fallback rate).
    pub priced: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelsAnswer {
    /// The model a chat gets when it names none.
    pub default_model: String,
    /// True when `OPENAI_ALLOWED_MODELS` is `*`: any name is accepted, the list is a suggestion.
    pub any_model: bool,
    /// The allowed models by name, the default first (patterns such as `o3*` allow more).
    pub models: Vec<ModelPrice>,
}

#[utoipa::path(get, path = "/api/models", tag = "openai",
    responses((status = 200, description = "Allowed models and their prices", body = ModelsAnswer)))]
pub(super) async fn models(State(state): State<AppState>) -> Json<ModelsAnswer> {
    let policy = state.guardrails.models();
    let pricing = &state.config.pricing;
    let default_model = state.config.openai.model.clone();
    let mut names = pricing.models();
    names.extend(policy.names());
    names.sort();
    names.dedup();
    names.retain(|m| *m != default_model);
    names.insert(0, default_model.clone());
    let models = names
        .into_iter()
        .filter(|m| policy.allows(m))
        .map(|id| {
            let quote = pricing.quote(&id);
            ModelPrice {
                input_usd_per_1m: quote.price.input,
                output_usd_per_1m: quote.price.output,
                priced: quote.priced,
                id,
            }
        })
        .collect();
    Json(ModelsAnswer {
        default_model,
        any_model: policy.any(),
        models,
    })
}
