// duet's page: ask a question, watch the Flash preview and the Pro answer stream in.
// Without API keys it uses EventSource on GET /query/stream (resumes with Last-Event-ID on
// its own). With keys it streams with fetch and an Authorization header, since EventSource
// cannot send headers and keys never go in URLs; it then resumes by hand.
"use strict";

const authRequired = document.body.dataset.authRequired === "true";
const $ = (id) => document.getElementById(id);
const panels = { flash: $("flash"), pro: $("pro") };
const statusEl = $("status");
let current = null; // { close(): void }
let finished = true;

if (authRequired) $("key-row").hidden = false;

const ERROR_LABELS = {
  timeout: "Timed out",
  rate_limited: "Rate limited by the provider",
  provider_error: "The provider failed",
  invalid_response: "The provider sent a broken answer",
  cancelled: "Cancelled",
  internal: "Internal error",
};

function part(panel, name) { return panel.querySelector(`[data-${name}]`); }

function resetPanels() {
  for (const panel of Object.values(panels)) {
    panel.className = "answer";
    part(panel, "text").textContent = "";
    part(panel, "meta").textContent = "thinking…";
    const err = part(panel, "error");
    err.hidden = true;
    err.textContent = "";
  }
  $("run-id").textContent = "starting…";
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("stop").disabled = !busy;
}

function describe(data) {
  const u = data.usage || {};
  const bits = [`${data.provider} · ${data.model_name}`, `${data.latency_ms} ms`];
  if (data.ttft_ms != null) bits.push(`first token ${data.ttft_ms} ms`);
  if (u.input_tokens != null || u.output_tokens != null) {
    bits.push(`${u.input_tokens ?? "?"} in / ${u.output_tokens ?? "?"} out tokens`);
  }
  return bits.join(" · ");
}

function handle(name, data) {
  switch (name) {
    case "start":
      $("run-id").textContent = data.run_id;
      statusEl.textContent = "Both models are working…";
      break;
    case "delta": {
      const panel = panels[data.model];
      if (panel) part(panel, "text").textContent += data.text;
      break;
    }
    case "flash":
    case "pro": {
      const panel = panels[name];
      part(panel, "text").textContent = data.text;
      part(panel, "meta").textContent = describe(data);
      panel.classList.add("done");
      if (name === "pro") {
        panels.flash.classList.add("superseded");
        statusEl.textContent = "The Pro answer is in.";
      } else {
        statusEl.textContent = "Flash preview is in; Pro is still working…";
      }
      break;
    }
    case "error": {
      const label = ERROR_LABELS[data.error_type] || data.error_type;
      const panel = data.model ? panels[data.model] : null;
      if (panel) {
        const err = part(panel, "error");
        err.hidden = false;
        err.textContent = `${label}: ${data.message}`;
        part(panel, "meta").textContent = label.toLowerCase();
      } else {
        statusEl.textContent = `${label}: ${data.message}`;
      }
      break;
    }
    case "done": {
      finished = true;
      if (data.flash === "skipped") {
        part(panels.flash, "meta").textContent = "skipped: Pro answered first";
      }
      const words = { ok: "Done", partial: "Done, with the preview only", failed: "Both models failed", cancelled: "Cancelled" };
      statusEl.textContent = `${words[data.status] || data.status} (flash ${data.flash}, pro ${data.pro}, ${data.total_ms} ms).`;
      stop();
      break;
    }
  }
}

function stop() {
  if (current) current.close();
  current = null;
  setBusy(false);
}

const EVENTS = ["start", "delta", "flash", "pro", "error", "done"];

function streamWithEventSource(query) {
  const es = new EventSource(`/query/stream?q=${encodeURIComponent(query)}&deltas=1`);
  for (const name of EVENTS) {
    es.addEventListener(name, (ev) => {
      // The browser fires its own "error" events (no data) on connection problems; the
      // service's error events always carry data.
      if (name === "error" && !ev.data) {
        if (finished) return;
        statusEl.textContent = es.readyState === EventSource.CONNECTING
          ? "Connection lost; reconnecting where we left off…"
          : "The connection closed before the run ended.";
        if (es.readyState === EventSource.CLOSED) stop();
        return;
      }
      handle(name, JSON.parse(ev.data));
    });
  }
  return { close: () => es.close() };
}

// A minimal SSE reader (WHATWG rules: CRLF, CR or LF line ends; comments; one data buffer).
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let ev = { event: "", data: "", id: null };
  let sawCr = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    let chunk = value;
    if (sawCr && chunk.startsWith("\n")) chunk = chunk.slice(1);
    sawCr = chunk.endsWith("\r");
    buf += chunk;
    const lines = buf.split(/\r\n|\r|\n/);
    buf = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (ev.data !== "") onEvent(ev.event || "message", ev.data.replace(/\n$/, ""), ev.id);
        ev = { event: "", data: "", id: ev.id };
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let val = i < 0 ? "" : line.slice(i + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") ev.event = val;
        else if (field === "data") ev.data += val + "\n";
        else if (field === "id") ev.id = val;
      }
    }
  }
}

function streamWithFetch(query, key) {
  const controller = new AbortController();
  let lastId = null;
  (async () => {
    for (let attempt = 0; attempt < 5 && !finished; attempt++) {
      const headers = { "Content-Type": "application/json", Accept: "text/event-stream", Authorization: `Bearer ${key}` };
      if (lastId) headers["Last-Event-ID"] = lastId;
      let resp;
      try {
        resp = await fetch("/query/stream", {
          method: "POST", headers, signal: controller.signal,
          body: JSON.stringify({ query, deltas: true }),
        });
      } catch (e) {
        if (controller.signal.aborted) return;
        statusEl.textContent = "Connection lost; reconnecting…";
        await new Promise((r) => setTimeout(r, 2000));
        continue;
      }
      if (resp.status === 204) return;
      if (!resp.ok) {
        let message = `HTTP ${resp.status}`;
        try { message = (await resp.json()).error.message; } catch (_) { /* not JSON */ }
        statusEl.textContent = resp.status === 401 ? "The API key was refused." : message;
        stop();
        return;
      }
      try {
        await readEvents(resp.body, (name, data, id) => {
          if (id) lastId = id;
          handle(name, JSON.parse(data));
        });
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      if (!finished) {
        statusEl.textContent = "Connection lost; reconnecting where we left off…";
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
    if (!finished) { statusEl.textContent = "Gave up reconnecting."; stop(); }
  })();
  return { close: () => controller.abort() };
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const query = $("query").value.trim();
  if (!query) { statusEl.textContent = "Type a question first."; $("query").focus(); return; }
  let key = "";
  if (authRequired) {
    key = $("api-key").value.trim();
    if (!key) { statusEl.textContent = "This service needs an API key."; $("api-key").focus(); return; }
  }
  stop();
  resetPanels();
  finished = false;
  setBusy(true);
  current = authRequired ? streamWithFetch(query, key) : streamWithEventSource(query);
});

$("stop").addEventListener("click", () => {
  finished = true;
  statusEl.textContent = "Stopped.";
  stop();
});
