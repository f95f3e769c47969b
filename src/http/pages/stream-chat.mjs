// Streams one chat reply from the AL-Chat service (Docs/STREAMING.md).
// baseUrl: "" on the site's own pages, or e.g. "http://localhost:5000".
// onDelta(text) gets each piece as it arrives; signal (an AbortSignal) stops the reply, and the
// service then closes its OpenAI request. token: the site's signed token, when the service has
// AUTH_JWT_* set (Docs/SECURITY.md). Resolves with {message, usage, timestamp}; rejects with an
// Error whose message is the sentence the service gave and whose status is the HTTP status.
export async function streamChat(baseUrl, body, { onDelta = () => {}, signal, sessionId, token } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (sessionId) headers["X-Session-ID"] = sessionId;
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(`${baseUrl}/api/chat`, {
    method: "POST",
    headers,
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) {
    // The service's errors are JSON; a proxy in front of it may answer with an HTML page.
    const text = await response.text();
    let message = `The chat service answered HTTP ${response.status}.`;
    try {
      message = JSON.parse(text).error || message;
    } catch {
      // Not JSON: keep the status sentence.
    }
    throw Object.assign(new Error(message), { status: response.status });
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("The connection closed before the reply was complete.");
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue; // a keep-alive comment
      const payload = JSON.parse(data);
      if (event === "delta") onDelta(payload.content);
      else if (event === "done") return payload; // {message, usage, timestamp}
      else if (event === "error") throw new Error(payload.error);
    }
  }
}
