// The playground: one conversation, streamed through /api/chat with the documented browser code
// (src/http/pages/stream-chat.mjs, served as /assets/stream-chat.mjs).
import { streamChat } from "/assets/stream-chat.mjs";

const $ = (id) => document.getElementById(id);
let prices = new Map();
let history = [];
let controller = null;
// With AUTH_JWT_* set, chats need a token the site signed: asked for after the first 401, kept in
// this tab only.
const SITE_TOKEN_KEY = "al-chat-site-token";

function siteToken() {
  const typed = $("site-token").value.trim();
  if (typed) sessionStorage.setItem(SITE_TOKEN_KEY, typed);
  return typed || sessionStorage.getItem(SITE_TOKEN_KEY) || undefined;
}

function turn(who, text) {
  const div = document.createElement("div");
  div.className = `turn ${who}`;
  const label = document.createElement("div");
  label.className = "who";
  label.textContent = who === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  $("conversation").append(div);
  return div;
}

function costOf(usage) {
  const price = prices.get(usage.model);
  if (!price) return null;
  return (usage.prompt_tokens * price.input_usd_per_1m + usage.completion_tokens * price.output_usd_per_1m) / 1e6;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("model").disabled = on;
}

async function loadModels() {
  try {
    const response = await fetch("/api/models", { cache: "no-store" });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    prices = new Map(answer.models.map((m) => [m.id, m]));
    const select = $("model");
    for (const m of answer.models) {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.id === answer.default_model ? `${m.id} (default)` : m.id;
      select.append(option);
    }
    select.value = answer.default_model;
    document.body.dataset.ready = "true";
  } catch (e) {
    showError(`Could not load the models: ${e.message}`);
  }
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message || controller) return;
  showError("");
  const model = $("model").value;
  turn("user", message);
  const reply = turn("assistant", "");
  const text = reply.querySelector(".text");
  $("message").value = "";
  controller = new AbortController();
  busy(true);
  try {
    const done = await streamChat("", { message, model, history }, {
      signal: controller.signal,
      token: siteToken(),
      onDelta: (piece) => {
        text.textContent += piece;
      },
    });
    history = [...history, { role: "user", content: message }, { role: "assistant", content: done.message }];
    const usage = document.createElement("div");
    usage.className = "usage";
    const cost = costOf(done.usage);
    usage.textContent = `${done.usage.model} · ${done.usage.prompt_tokens} prompt + ${done.usage.completion_tokens} completion tokens`
      + (cost == null ? "" : ` · $${cost.toFixed(6)}`);
    reply.append(usage);
    reply.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      const note = document.createElement("div");
      note.className = "usage";
      note.textContent = "Stopped.";
      reply.append(note);
      reply.dataset.state = "stopped";
    } else {
      reply.remove();
      showError(e.message);
      if (e.status === 401) {
        sessionStorage.removeItem(SITE_TOKEN_KEY);
        $("site-token-row").hidden = false;
        $("site-token").focus();
      }
    }
  } finally {
    controller = null;
    busy(false);
  }
}

$("chat-form").addEventListener("submit", send);
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => {
  controller?.abort();
  history = [];
  $("conversation").replaceChildren();
  showError("");
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

loadModels();
