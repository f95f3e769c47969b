// Drives the service's pages in headless Chromium (the Debian package) with playwright-core and
// prints what a person would have seen as one JSON line. Used by tests/api/browser_pages.rs,
// which starts the service and the mock upstream and asserts on that line.
//   node pages-driver.mjs SCENARIO BASE_URL SHOT_DIR [ARG]
// Needs PLAYWRIGHT_CORE (the installed playwright-core folder) and CHROMIUM_BIN; scripts/test
// sets both.
import http from "node:http";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [scenario, base, shots, arg] = process.argv.slice(2);
const { chromium } = await import(pathToFileURL(path.join(process.env.PLAYWRIGHT_CORE, "index.mjs")));
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM_BIN, headless: true });
// Script errors and policy violations; failed loads are listed apart (some are expected: a 401
// before the token is given, a 503 the page shows as a sentence).
const consoleErrors = [];
const failedLoads = [];

async function open(url, viewport = { width: 1280, height: 900 }) {
  const page = await browser.newPage({ viewport });
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
  });
  page.on("response", (r) => r.status() >= 400 && failedLoads.push(`${r.status()} ${new URL(r.url()).pathname}`));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  return page;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const scenarios = {
  // Swagger UI from inside the binary: every operation it lists.
  async docs() {
    const page = await open(`${base}/docs/`);
    await page.waitForSelector(".opblock-summary-path", { timeout: 15000 });
    const operations = await page.$$eval(".opblock", (blocks) => blocks.map((b) => {
      const method = b.querySelector(".opblock-summary-method")?.textContent.trim();
      const p = b.querySelector(".opblock-summary-path")?.getAttribute("data-path")
        ?? b.querySelector(".opblock-summary-path")?.textContent.trim();
      return `${method} ${p}`;
    }));
    await page.screenshot({ path: `${shots}/docs.png`, fullPage: true });
    return { operations };
  },

  // The dashboard as drawn: its bars, totals and sessions, on a desktop and a phone.
  async dashboard() {
    const page = await open(`${base}/dashboard`);
    let askedForToken = false;
    if (arg) {
      await page.waitForSelector("#token-form", { state: "visible", timeout: 10000 });
      askedForToken = true;
      await page.fill("#token", arg);
      await page.click("#token-form button");
    }
    await page.waitForSelector("body[data-loaded=true]", { timeout: 10000 });
    const read = () => page.evaluate(() => ({
      bars: [...document.querySelectorAll("#by-model-chart rect")].map((r) => ({
        model: r.dataset.model, metric: r.dataset.metric, value: Number(r.dataset.value),
        width: Number(r.getAttribute("width")),
      })),
      minutes: [...document.querySelectorAll("#per-minute-chart rect")].map((r) => Number(r.dataset.chats)),
      totals: {
        requests: document.getElementById("total-requests").textContent,
        tokens: document.getElementById("total-tokens").textContent,
        cost: document.getElementById("total-cost").textContent,
        budget: document.getElementById("budget-left").textContent,
      },
      sessions: [...document.querySelectorAll("#sessions tbody tr")].map((tr) =>
        [...tr.cells].map((c) => c.textContent)),
      consumers: [...document.querySelectorAll("#consumers tbody tr")].map((tr) =>
        [...tr.cells].map((c) => c.textContent)),
      health: document.getElementById("health").textContent,
      refusals: document.getElementById("refusals").textContent,
      tokenStored: sessionStorage.getItem("al-chat-admin-token") !== null,
    }));
    const first = await read();
    await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
    // A refresh without reloading: the page redraws within its 5 s period on its own.
    const marker = await page.evaluate(() => document.getElementById("updated").textContent);
    await page.waitForFunction((m) => document.getElementById("updated").textContent !== m, marker, { timeout: 12000 });
    const reloaded = await page.evaluate(() => performance.getEntriesByType("navigation").length);
    const phone = await open(`${base}/dashboard`, { width: 390, height: 844 });
    if (arg) {
      await phone.fill("#token", arg);
      await phone.click("#token-form button");
    }
    await phone.waitForSelector("body[data-loaded=true]", { timeout: 10000 });
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    await phone.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });
    return { ...first, askedForToken, refreshedInPlace: reloaded === 1, phoneOverflowPx: overflow };
  },

  // A streamed reply growing piece by piece, then its usage line.
  async playground() {
    const page = await open(`${base}/playground`);
    await page.waitForSelector("body[data-ready=true]", { timeout: 10000 });
    const models = await page.$$eval("#model option", (os) => os.map((o) => o.value));
    if (arg) await page.selectOption("#model", arg);
    await page.fill("#message", "Hello there");
    await page.click("#send");
    const states = [];
    const deadline = Date.now() + 15000;
    for (;;) {
      const { text, state } = await page.evaluate(() => {
        const reply = document.querySelector(".turn.assistant:last-of-type");
        return { text: reply?.querySelector(".text").textContent ?? "", state: reply?.dataset.state ?? "" };
      });
      if (states[states.length - 1] !== text) states.push(text);
      if (state === "done" || Date.now() > deadline) break;
      await sleep(15);
    }
    const usage = await page.$eval(".turn.assistant .usage", (u) => u.textContent).catch(() => null);
    await page.screenshot({ path: `${shots}/playground.png`, fullPage: true });
    return { models, states, usage };
  },

  // Stop while the reply streams.
  async "playground-stop"() {
    const page = await open(`${base}/playground`);
    await page.waitForSelector("body[data-ready=true]", { timeout: 10000 });
    await page.fill("#message", "Tell me a long story");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelector(".turn.assistant .text")?.textContent.length > 0,
      null, { timeout: 10000 });
    const stopEnabled = await page.isEnabled("#stop");
    await page.click("#stop");
    await page.waitForSelector(".turn.assistant[data-state=stopped]", { timeout: 10000 });
    return {
      stopEnabled,
      text: await page.$eval(".turn.assistant .text", (t) => t.textContent),
      sendEnabledAfter: await page.isEnabled("#send"),
    };
  },

  // With AUTH_JWT_* set: the first chat is refused, the page asks for the site token (ARG), and the
  // chat sent again with it streams.
  async "playground-token"() {
    const page = await open(`${base}/playground`);
    await page.waitForSelector("body[data-ready=true]", { timeout: 10000 });
    const askedBefore = await page.isVisible("#site-token");
    await page.fill("#message", "Hello");
    await page.click("#send");
    await page.waitForSelector("#error:not([hidden])", { timeout: 10000 });
    const error = await page.$eval("#error", (e) => e.textContent);
    const asked = await page.isVisible("#site-token");
    await page.fill("#site-token", arg);
    await page.fill("#message", "Hello again");
    await page.click("#send");
    await page.waitForSelector(".turn.assistant[data-state=done]", { timeout: 10000 });
    return {
      askedBefore,
      error,
      asked,
      reply: await page.$eval(".turn.assistant .text", (t) => t.textContent),
      errorHidden: await page.$eval("#error", (e) => e.hidden),
      tokenKept: await page.evaluate(() => sessionStorage.getItem("al-chat-site-token") !== null),
    };
  },

  // An error the API gives, shown as its sentence.
  async "playground-error"() {
    const page = await open(`${base}/playground`);
    await page.waitForSelector("body[data-ready=true]", { timeout: 10000 });
    await page.fill("#message", "Hello");
    await page.click("#send");
    await page.waitForSelector("#error:not([hidden])", { timeout: 10000 });
    return { error: await page.$eval("#error", (e) => e.textContent) };
  },

  // A page from another origin calls the API with fetch, as the site's chat window does.
  async cors() {
    const origin = http.createServer((_, res) => {
      res.writeHead(200, { "Content-Type": "text/html" });
      res.end(`<!doctype html><title>site</title><script>
        window.results = (async () => {
          const api = ${JSON.stringify(base)};
          // With a site token (ARG), both calls carry it, as ChatWindow.js would.
          const token = ${JSON.stringify(arg ?? null)};
          const auth = token ? { Authorization: "Bearer " + token } : {};
          const started = await fetch(api + "/api/session/start", {
            method: "POST", headers: { "Content-Type": "application/json", ...auth }, body: "{}" });
          const start = await started.json();
          const chatted = await fetch(api + "/api/chat", {
            method: "POST",
            headers: { "Content-Type": "application/json", "X-Session-ID": start.session_id, ...auth },
            body: JSON.stringify({ message: "Hello from the site", sessionId: start.session_id }),
          });
          const chat = await chatted.json();
          return { startStatus: started.status, sessionId: start.session_id,
                   chatStatus: chatted.status, message: chat.message,
                   requestId: chatted.headers.get("x-request-id") };
        })().catch((e) => ({ error: String(e) }));
      </script>`);
    });
    await new Promise((resolve) => origin.listen(0, "127.0.0.1", resolve));
    const page = await browser.newPage();
    // Preflights are visible on the DevTools protocol, not as page requests.
    const cdp = await page.context().newCDPSession(page);
    await cdp.send("Network.enable");
    const preflights = [];
    cdp.on("Network.requestWillBeSent", (e) => {
      if (e.request.method === "OPTIONS") preflights.push(e.request.url);
    });
    const pageOrigin = `http://127.0.0.1:${origin.address().port}`;
    await page.goto(`${pageOrigin}/`);
    const results = await page.evaluate(() => window.results);
    origin.close();
    return { pageOrigin, ...results, preflights };
  },
};

try {
  const result = await scenarios[scenario]();
  console.log(JSON.stringify({ ...result, consoleErrors, failedLoads }));
} finally {
  await browser.close();
}
