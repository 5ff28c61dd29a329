// duet's page: a conversation with both models. Each turn streams the Flash preview and the
// Pro answer side by side; the final answer of a turn (Pro's, or Flash's when Pro failed) is
// what the next turn sends back as the `assistant` message.
//
// It posts with fetch and reads the event stream by hand: EventSource can neither POST a
// conversation nor send an Authorization header (keys never go in URLs). When the connection
// drops before `done`, it resumes with GET /query/stream and `Last-Event-ID`, as docs/api.md
// describes. Answers are Markdown: markdown.js renders them (marked) and sanitizes the HTML
// (DOMPurify) before it reaches the document, so no answer can run code here.
"use strict";

const authRequired = document.body.dataset.authRequired === "true";
const $ = (id) => document.getElementById(id);
const statusEl = $("status");
const conversationEl = $("conversation");
const questionEl = $("query");

/** The conversation so far: a `user` and an `assistant` message per turn that got an answer. */
let history = [];
/** Bumped by "New conversation", so that a turn still ending then stays out of the new one. */
let generation = 0;
/** The running turn's AbortController, or null. */
let running = null;

/** How often, and after how long, a dropped stream is resumed before the page gives up. */
const RESUME_DELAYS_MS = [250, 1000, 2000, 4000, 8000];

const ERROR_LABELS = {
  timeout: "Timed out",
  rate_limited: "Rate limited by the provider",
  provider_error: "The provider failed",
  invalid_response: "The provider sent a broken answer",
  cancelled: "Cancelled",
  internal: "Internal error",
};

// ---- Server-Sent Events, read by hand (the WHATWG parsing rules) ----

/** Far more than any event duet sends; a stream past it is broken, not merely long. */
const MAX_PENDING_CHARS = 16 * 1024 * 1024;

/**
 * Parses an event stream fed as text in pieces cut anywhere. Lines end with CRLF, LF or CR
 * (a CRLF may be cut between two pieces); `data` lines of one event are joined with "\n";
 * lines starting with ":" are comments (keep-alives); an event is dispatched at a blank line,
 * and only when it has data. What is left without a blank line when the stream ends is not
 * an event.
 */
class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent; // (type, data, lastEventId)
    this.line = "";
    this.afterCr = false;
    this.type = "";
    this.data = "";
    this.id = "";
  }

  push(text) {
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c === 10 && this.afterCr) {
        // The LF of a CRLF whose CR ended the previous line.
        this.afterCr = false;
        start = i + 1;
        continue;
      }
      this.afterCr = false;
      if (c === 10 || c === 13) {
        const line = this.line + text.slice(start, i);
        this.line = "";
        this.afterCr = c === 13;
        start = i + 1;
        this.processLine(line);
      }
    }
    this.line += text.slice(start);
    if (this.line.length + this.data.length > MAX_PENDING_CHARS) {
      throw new Error("event stream: an event is too long");
    }
  }

  processLine(line) {
    if (line === "") {
      if (this.data !== "") this.onEvent(this.type || "message", this.data.slice(0, -1), this.id);
      this.type = "";
      this.data = "";
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data += value + "\n";
    else if (field === "id" && !value.includes("\0")) this.id = value;
  }
}

/** Reads one response's events into `onEvent` until the body ends or the connection drops. */
async function readEvents(resp, onEvent) {
  const parser = new SseParser(onEvent);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (_) {
      return; // the connection dropped, or Stop aborted it: the caller knows which
    }
    if (chunk.done) return;
    parser.push(chunk.value);
  }
}

// ---- Markdown: renderMarkdown, from markdown.js ----

/** One model's side of a turn: its text so far, shown at most once per animation frame. */
class Panel {
  constructor(el) {
    this.el = el;
    this.text = "";
    this.whole = null; // the whole answer, once its `flash`/`pro` event came
    this.scheduled = false;
  }

  part(name) { return this.el.querySelector(`[data-${name}]`); }

  append(text) {
    this.text += text;
    this.schedule();
  }

  finish(text) {
    this.text = text;
    this.whole = text;
    this.schedule();
  }

  // Rendering the whole text again costs as much as the text is long: once a frame keeps
  // that bounded however fast the deltas come.
  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      renderMarkdown(this.part("text"), this.text);
    });
  }
}

// ---- Turns ----

/** Nothing but white space, as the service counts it (its `[^\s\u0085]` rule for contents). */
const isBlank = (text) => /^[\s\u0085]*$/.test(text);

function addTurn(question) {
  const el = $("turn-template").content.firstElementChild.cloneNode(true);
  el.querySelector("[data-question]").textContent = question;
  conversationEl.append(el);
  $("empty").hidden = true;
  return {
    el,
    panels: { flash: new Panel(el.querySelector(".flash")), pro: new Panel(el.querySelector(".pro")) },
    runId: el.querySelector("[data-run-id]"),
    /**
     * The answer the next turn sends back: Pro's, or Flash's when Pro has none. A blank one
     * counts as none: the service refuses a blank message, so it would fail every later turn.
     */
    final() {
      const { pro, flash } = this.panels;
      return [pro.whole, flash.whole].find((t) => t !== null && !isBlank(t)) ?? null;
    },
  };
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

function handle(turn, name, data) {
  const { panels } = turn;
  switch (name) {
    case "start":
      turn.runId.textContent = data.run_id;
      statusEl.textContent = "Both models are working…";
      break;
    case "delta": {
      const panel = panels[data.model];
      if (panel) panel.append(data.text);
      break;
    }
    case "flash":
    case "pro": {
      const panel = panels[name];
      panel.finish(data.text);
      panel.part("meta").textContent = describe(data);
      panel.el.classList.add("done");
      if (name === "pro") {
        panels.flash.el.classList.add("superseded");
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
        const err = panel.part("error");
        err.hidden = false;
        err.textContent = `${label}: ${data.message}`;
        panel.part("meta").textContent = label.toLowerCase();
      } else {
        statusEl.textContent = `${label}: ${data.message}`;
      }
      break;
    }
    case "done": {
      if (data.flash === "skipped") {
        panels.flash.part("meta").textContent = "skipped: Pro answered first";
      }
      const words = { ok: "Done", partial: "Done, with the preview only", failed: "Both models failed", cancelled: "Cancelled" };
      statusEl.textContent = `${words[data.status] || data.status} (flash ${data.flash}, pro ${data.pro}, ${data.total_ms} ms).`;
      break;
    }
  }
}

// ---- Running a turn ----

async function errorMessage(resp) {
  if (resp.status === 401) return "The API key was refused.";
  try {
    return (await resp.json()).error.message;
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/**
 * Streams one turn's run into `turn` and says how it ended: `{kind: "done"}`, `"stopped"`,
 * `"refused"` (no run started; `message` says why) or `"lost"` (the run could not be followed
 * to its end; `message`).
 */
async function stream(turn, body, key, signal) {
  const headers = { Accept: "text/event-stream" };
  if (key) headers.Authorization = `Bearer ${key}`;
  let lastId = "";
  let finished = false;
  const onEvent = (name, data, id) => {
    handle(turn, name, JSON.parse(data));
    if (id) lastId = id;
    if (name === "done") finished = true;
  };

  let resp;
  try {
    resp = await fetch("/query/stream", {
      method: "POST", signal, body: JSON.stringify(body),
      headers: { ...headers, "Content-Type": "application/json" },
    });
  } catch (_) {
    // Not sent again: without an event id nothing can be resumed, and a second POST could
    // start a second run of the same question.
    if (signal.aborted) return { kind: "stopped" };
    return { kind: "refused", message: "Could not reach the service." };
  }
  if (!resp.ok) return { kind: "refused", status: resp.status, message: await errorMessage(resp) };
  await readEvents(resp, onEvent);

  for (let attempt = 0; !finished; attempt++) {
    if (signal.aborted) return { kind: "stopped" };
    if (!lastId) return { kind: "lost", message: "The connection closed before the run started." };
    if (attempt >= RESUME_DELAYS_MS.length) return { kind: "lost", message: "Gave up reconnecting." };
    statusEl.textContent = "Connection lost; reconnecting where we left off…";
    await sleep(RESUME_DELAYS_MS[attempt], signal);
    if (signal.aborted) return { kind: "stopped" };
    try {
      resp = await fetch("/query/stream", { signal, headers: { ...headers, "Last-Event-ID": lastId } });
    } catch (_) {
      continue; // still unreachable: try again after the next delay
    }
    // 204: the run has ended and nothing is left after `lastId`; 404: this service no longer
    // knows the run. Neither will change by asking again.
    if (resp.status === 204) return { kind: "lost", message: "The run ended; its last events are gone." };
    if (resp.status === 429 || resp.status >= 500) continue;
    if (!resp.ok) return { kind: "lost", message: `Could not resume the run: ${await errorMessage(resp)}` };
    await readEvents(resp, onEvent);
  }
  return { kind: "done" };
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("stop").disabled = !busy;
}

function ask(question, key) {
  const messages = [...history, { role: "user", content: question }];
  // A first question goes as `query`, which every duet version takes; a conversation goes as
  // `messages`.
  const body = messages.length === 1 ? { query: question, deltas: true } : { messages, deltas: true };
  const turn = addTurn(question);
  const controller = new AbortController();
  const asked = generation;
  running = controller;
  setBusy(true);
  statusEl.textContent = "Sending…";
  stream(turn, body, key, controller.signal)
    .catch((e) => {
      controller.abort(); // a broken stream is not read any further
      return { kind: "lost", message: `The page failed: ${e.message}` };
    })
    .then((outcome) => {
      if (running === controller) {
        running = null;
        setBusy(false);
      }
      if (asked !== generation) return; // the conversation was cleared meanwhile
      if (outcome.kind === "refused") {
        // No run, no turn: the question goes back into the box to be sent again.
        turn.el.remove();
        $("empty").hidden = conversationEl.querySelector(".turn") !== null;
        if (!questionEl.value) questionEl.value = question;
        // The whole conversation counts against MAX_QUERY_BYTES: say how to get past it.
        const tooLong = outcome.status === 413 && history.length > 0;
        statusEl.textContent = tooLong ? `${outcome.message}. The conversation is too long: start a new one.` : outcome.message;
        return;
      }
      turn.el.dataset.outcome = outcome.kind;
      const answer = turn.final();
      if (answer !== null) {
        history.push({ role: "user", content: question }, { role: "assistant", content: answer });
      } else {
        turn.el.classList.add("left-out");
        turn.el.querySelector("[data-kept]").textContent = "· no answer, so this turn is left out of the conversation";
      }
      if (outcome.kind === "stopped") statusEl.textContent = "Stopped.";
      else if (outcome.kind === "lost") statusEl.textContent = outcome.message;
    });
}

if (authRequired) $("key-row").hidden = false;

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  if (running) return;
  const question = questionEl.value.trim();
  if (!question) { statusEl.textContent = "Type a question first."; questionEl.focus(); return; }
  let key = "";
  if (authRequired) {
    key = $("api-key").value.trim();
    if (!key) { statusEl.textContent = "This service needs an API key."; $("api-key").focus(); return; }
  }
  questionEl.value = "";
  ask(question, key);
});

// Ctrl+Enter (⌘+Enter) sends, as in most chat boxes; Enter alone makes a new line.
questionEl.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (running) running.abort();
});

$("new").addEventListener("click", () => {
  if (running) running.abort();
  generation++;
  history = [];
  for (const turn of conversationEl.querySelectorAll(".turn")) turn.remove();
  $("empty").hidden = false;
  statusEl.textContent = "New conversation.";
  questionEl.focus();
});
