// Runs src/http/pages/stream-chat.mjs (Docs/STREAMING.md's browser code), exactly as documented,
// against a live service and prints what a page would have seen as one JSON line. Used by
// tests/api/browser_snippet.rs.
//   node stream-chat-driver.mjs BASE_URL ok|abort|json-error|html-error
import http from "node:http";
import { streamChat } from "../../src/http/pages/stream-chat.mjs";

const [baseUrl, scenario] = process.argv.slice(2);
const deltas = [];
const onDelta = (text) => deltas.push(text);

async function run() {
  switch (scenario) {
    case "ok": {
      const done = await streamChat(baseUrl, { message: "hi" }, { onDelta });
      return { deltas, done };
    }
    case "abort": {
      const controller = new AbortController();
      try {
        await streamChat(baseUrl, { message: "hi" }, {
          signal: controller.signal,
          onDelta: (text) => {
            deltas.push(text);
            controller.abort();
          },
        });
        return { deltas, aborted: false };
      } catch (e) {
        return { deltas, aborted: e.name === "AbortError", error: e.name };
      }
    }
    case "json-error":
      try {
        await streamChat(baseUrl, { message: "" }, { onDelta });
        return { error: null };
      } catch (e) {
        return { error: e.message };
      }
    case "html-error": {
      // A proxy's error page in front of the service.
      const proxy = http.createServer((_, res) => {
        res.writeHead(502, { "Content-Type": "text/html" });
        res.end("<html><body><h1>502 Bad Gateway</h1></body></html>");
      });
      await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
      try {
        await streamChat(`http://127.0.0.1:${proxy.address().port}`, { message: "hi" }, { onDelta });
        return { error: null };
      } catch (e) {
        return { error: e.message };
      } finally {
        proxy.close();
      }
    }
    default:
      throw new Error(`unknown scenario ${scenario}`);
  }
}

console.log(JSON.stringify(await run()));
