// The dashboard: reads /api/openai/usage and /api/dashboard every few seconds and draws them.
// Every figure is written with textContent or as an SVG attribute, never as HTML, so a model name
// or a session id cannot inject markup.
const REFRESH_MS = 5000;
const TOKEN_KEY = "al-chat-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

class TokenRequired extends Error {}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function getJson(path) {
  const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) throw new TokenRequired();
  let body = {};
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's page): the status says enough.
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status} from ${path}`);
  return body;
}

const usd = (x) => `$${Number(x || 0).toFixed(4)}`;
const count = (x) => Number(x || 0).toLocaleString("en-US");

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Two bars per model: cost (scaled to the largest cost) and tokens (to the largest count).
function drawByModel(byModel) {
  const rows = Object.entries(byModel || {}).sort((a, b) => b[1].cost_usd - a[1].cost_usd);
  const box = $("by-model-chart");
  if (rows.length === 0) {
    box.replaceChildren(document.createTextNode("No chats yet."));
    return;
  }
  const width = 640, label = 170, barMax = 330, rowH = 34;
  const maxCost = Math.max(...rows.map(([, m]) => m.cost_usd), 1e-12);
  const maxTokens = Math.max(...rows.map(([, m]) => m.total_tokens), 1);
  const svg = el("svg", { viewBox: `0 0 ${width} ${rows.length * rowH + 4}`, role: "img",
    "aria-label": "Cost and tokens by model" });
  rows.forEach(([model, m], i) => {
    const y = i * rowH + 2;
    const name = model.length > 24 ? `${model.slice(0, 23)}…` : model;
    svg.append(el("text", { x: 0, y: y + 19 }, name));
    const cost = el("rect", { class: "bar-cost", x: label, y, height: 14, rx: 2,
      width: Math.max(1, (m.cost_usd / maxCost) * barMax),
      "data-model": model, "data-metric": "cost", "data-value": m.cost_usd });
    cost.append(el("title", {}, `${model}: ${usd(m.cost_usd)}`));
    const tokens = el("rect", { class: "bar-tokens", x: label, y: y + 16, height: 12, rx: 2,
      width: Math.max(1, (m.total_tokens / maxTokens) * barMax),
      "data-model": model, "data-metric": "tokens", "data-value": m.total_tokens });
    tokens.append(el("title", {}, `${model}: ${count(m.total_tokens)} tokens`));
    svg.append(cost, tokens);
    svg.append(el("text", { x: label + barMax + 8, y: y + 12, class: "axis" }, usd(m.cost_usd)));
    svg.append(el("text", { x: label + barMax + 8, y: y + 27, class: "axis" },
      `${count(m.total_tokens)} tok · ${count(m.request_count)} chats`));
  });
  box.replaceChildren(svg);
}

function drawPerMinute(minutes) {
  const width = 640, height = 140, left = 34, bottom = 20, slot = (width - left) / 60;
  const max = Math.max(1, ...minutes.map((m) => m.chats));
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "Chats per minute over the last hour" });
  svg.append(el("text", { x: 0, y: 12, class: "axis" }, String(max)));
  svg.append(el("text", { x: 0, y: height - bottom, class: "axis" }, "0"));
  minutes.forEach((m, i) => {
    const h = (m.chats / max) * (height - bottom - 16);
    const bar = el("rect", { class: "bar-minute", x: left + i * slot + 1, y: height - bottom - h,
      width: Math.max(1, slot - 2), height: h, "data-minute": m.minute, "data-chats": m.chats });
    bar.append(el("title", {}, `${m.minute.slice(11, 16)}: ${m.chats} chats`));
    svg.append(bar);
  });
  const hhmm = (s) => (s ? s.slice(11, 16) : "");
  svg.append(el("text", { x: left, y: height - 4, class: "axis" }, hhmm(minutes[0]?.minute)));
  svg.append(el("text", { x: width - 36, y: height - 4, class: "axis" },
    hhmm(minutes[minutes.length - 1]?.minute)));
  $("per-minute-chart").replaceChildren(svg);
}

function fillList(id, pairs) {
  const dl = $(id);
  dl.replaceChildren();
  for (const [term, value, cls] of pairs) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    if (cls) dd.className = cls;
    dl.append(dt, dd);
  }
}

const statusClass = (s) => (s === "ok" ? "ok" : s === "spooling" ? "warn" : "bad");

function drawSessions(sessions) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  if (sessions.length === 0) {
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 4;
    cell.textContent = "No sessions yet.";
    return;
  }
  for (const s of sessions) {
    const row = body.insertRow();
    const time = (t) => (t ? t.slice(0, 19).replace("T", " ") : "–");
    const duration = s.duration_seconds == null
      ? (s.stopped ? "unknown" : "open")
      : `${s.duration_seconds.toFixed(1)} s`;
    for (const text of [s.session_id, time(s.started), time(s.stopped), duration]) {
      row.insertCell().textContent = text;
    }
  }
}

function drawConsumers(consumers) {
  const body = $("consumers").tBodies[0];
  body.replaceChildren();
  if (consumers.length === 0) {
    const cell = body.insertRow().insertCell();
    cell.colSpan = 5;
    cell.textContent = "No chats today yet.";
    return;
  }
  for (const c of consumers) {
    const row = body.insertRow();
    const who = c.kind === "guest" ? `guest ${c.name}` : c.name;
    const left = c.quota_left == null ? "no quota" : count(c.quota_left);
    for (const text of [who, count(c.tokens), count(c.requests), usd(c.cost_usd), left]) {
      row.insertCell().textContent = text;
    }
  }
}

function draw(usage, board) {
  $("total-requests").textContent = count(usage.request_count);
  $("total-tokens").textContent = count(usage.total_tokens);
  $("total-cost").textContent = usd(usage.estimated_cost_usd);
  const remaining = usage.budget?.remaining;
  $("budget-left").textContent = !usage.budget
    ? "no budget set"
    : [remaining.daily_usd != null ? usd(remaining.daily_usd) : null,
       remaining.daily_tokens != null ? `${count(remaining.daily_tokens)} tokens` : null]
        .filter(Boolean).join(" · ") || "session caps only";
  drawByModel(usage.by_model);
  drawPerMinute(board.chats_per_minute);
  const papita = board.papita;
  const records = papita.usage_records || {};
  const log = board.session_log;
  fillList("health", [
    ["Papita", papita.status, statusClass(papita.status)],
    ["records sent / spooled / dropped",
      `${count(records.sent)} / ${count(records.spooled)} / ${count(records.dropped)}`],
    ["session log", log.status + (log.reason ? ` (${log.reason})` : ""), statusClass(log.status)],
    ["lines written / dropped", `${count(log.written)} / ${count(log.dropped)}`],
    ["streams open", count(board.streams_open)],
    // With fallback upstreams: each one's circuit breaker (Docs/RESILIENCE.md).
    ...(board.upstreams || []).map((u) => [
      `upstream ${u.name}`,
      u.state.replace("_", "-"),
      u.state === "closed" ? "ok" : u.state === "half_open" ? "warn" : "bad",
    ]),
  ]);
  fillList("refusals", Object.entries(board.refusals).map(([k, v]) => [k.replaceAll("_", " "), count(v)]));
  drawSessions(board.recent_sessions);
  drawConsumers(board.consumers || []);
  $("updated").textContent = `Last update ${board.timestamp.slice(11, 19)}.`;
}

let timer;
async function refresh() {
  clearTimeout(timer);
  try {
    const [usage, board] = await Promise.all([getJson("/api/openai/usage"), getJson("/api/dashboard")]);
    draw(usage, board);
    $("board").hidden = false;
    $("token-section").hidden = true;
    $("status").textContent = "";
    document.body.dataset.loaded = "true";
  } catch (e) {
    if (e instanceof TokenRequired) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token-section").hidden = false;
      $("board").hidden = true;
      $("status").textContent = "";
      return; // No polling until a token is given.
    }
    $("status").textContent = `Could not refresh: ${e.message}`;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  refresh();
});

refresh();
