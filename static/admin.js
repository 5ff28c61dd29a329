// duet's operators' console (GET /admin): the runs of the audit trail from GET /runs, with
// its filters and cursor pages, a chart of the newest runs, and one run's page from
// GET /runs/{id} (both answers, a timeline, tokens, cost, outcome, errors).
//
// The admin token is typed in once and lives in one variable of this script: it goes out
// only as an `Authorization: Bearer` header, never into a URL, browser storage, a cookie or
// the console. A reload forgets it. A run's page is `#run=<id>`, so Back works; the hash
// holds the id, never the token.
//
// Model text is Markdown, rendered and sanitized by markdown.js (marked, DOMPurify); every
// other value goes in with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const statusEl = $("status");
const SVG_NS = "http://www.w3.org/2000/svg";

/** The admin token, or null until it is typed in (and again after a 401). */
let token = null;
/** The cursor of each page from the newest to the one shown (null for the newest). */
let cursors = [null];
/** The shown page's `next_cursor`. */
let nextCursor = null;
/** The filters applied, as query parameters (without limit and cursor). */
let filters = new URLSearchParams();
/** The newest `created_at` seen on the newest page: what "newer runs" are counted from. */
let newestSeen = null;
/** The live refresh timer, when live refresh is on. */
let liveTimer = null;

const LIVE_EVERY_MS = 5000;
/** The chart draws at most this many runs (one page of GET /runs). */
const CHART_RUNS = 500;

// ---- Talking to the admin API ----

/** Why a request did not give an answer: `status` is the HTTP status (0 when unreachable). */
class AdminError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** GETs `path` (with `params`) as JSON, with the token when there is one. */
async function getJson(path, params) {
  const url = params && [...params].length ? `${path}?${params}` : path;
  const headers = { Accept: "application/json" };
  const sent = token;
  if (sent !== null) headers.Authorization = `Bearer ${sent}`;
  let resp;
  try {
    resp = await fetch(url, { headers, cache: "no-store", credentials: "omit" });
  } catch (_) {
    throw new AdminError(0, "Could not reach the service.");
  }
  // The token was forgotten (or replaced) while this request was out: what it fetched must
  // not be shown any more. STALE is dropped by `failed`.
  if (token !== sent) throw new AdminError(STALE, "");
  if (resp.ok) {
    const body = await resp.json();
    if (token !== sent) throw new AdminError(STALE, "");
    return body;
  }
  let message = `HTTP ${resp.status}`;
  try {
    message = (await resp.json()).error.message;
  } catch (_) { /* not duet's error shape: keep the status */ }
  throw new AdminError(resp.status, message);
}

/** The status of a request whose token was forgotten or replaced before it came back. */
const STALE = -1;

/** What the console does when a request fails: ask for the token again, or say why. */
function failed(e) {
  if (e.status === STALE) {
    // Answered for a token the page no longer holds: nothing to show or say.
  } else if (e.status === 401) {
    forget("The token was refused. Type it again.");
  } else if (e.status === 429) {
    statusEl.textContent = "Too many wrong tokens from this address lately: wait a minute, then try again.";
  } else if (e.status === 404 && /admin API is off/.test(e.message)) {
    adminOff(e.message);
  } else {
    statusEl.textContent = e.message;
  }
}

function adminOff(message) {
  token = null;
  stopLive();
  $("login").hidden = true;
  $("runs-view").hidden = true;
  $("run-view").hidden = true;
  // "the admin API is off: set ADMIN_TOKEN …", as the service says it.
  statusEl.textContent = message.charAt(0).toUpperCase() + message.slice(1);
}

function forget(message) {
  token = null;
  stopLive();
  // What the token showed goes with it.
  $("runs").tBodies[0].replaceChildren();
  $("chart").replaceChildren();
  $("chart-caption").textContent = "";
  $("run-view").replaceChildren();
  $("live").checked = false;
  $("runs-view").hidden = true;
  $("run-view").hidden = true;
  $("login").hidden = false;
  $("token").value = "";
  $("token").focus();
  statusEl.textContent = message;
}

// ---- Formatting ----

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` in UTC. */
function utc(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
    `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
}

const dash = "—";
const count = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const ms = (n) => (n == null ? dash : `${n} ms`);
function cost(usd) {
  if (usd == null) return dash;
  return `$${usd.toFixed(usd !== 0 && usd < 0.01 ? 6 : 4)}`;
}
const agreement = (a) => (a == null ? dash : a.toFixed(2));

/** Makes an element with `props` (a `class` string, `text`, attributes) and children. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text != null) node.textContent = text;
  return node;
}

const badge = (status) => el("span", { class: `badge status-${status}`, text: status });

/** One model in a summary: its outcome, and the model's name as a tooltip. */
function modelCell(m) {
  if (!m) return el("td", { class: "muted", text: dash });
  return el("td", { title: m.model_name }, el("span", { class: `badge outcome-${m.outcome}`, text: m.outcome }));
}

// ---- The runs list ----

function readFilters() {
  const p = new URLSearchParams();
  const add = (name, value) => { if (value.trim() !== "") p.set(name, value.trim()); };
  add("status", $("f-status").value);
  // datetime-local is the browser's local time: the API wants an instant.
  for (const [name, id] of [["since", "f-since"], ["until", "f-until"]]) {
    const v = $(id).value;
    if (v) {
      const d = new Date(v);
      if (!Number.isNaN(d.getTime())) p.set(name, d.toISOString());
    }
  }
  add("model_name", $("f-model").value);
  add("client_id", $("f-client").value);
  // q is a substring: its spaces count, so it is sent as typed.
  if ($("f-q").value !== "") p.set("q", $("f-q").value);
  return p;
}

function pageParams(cursor) {
  const p = new URLSearchParams(filters);
  p.set("limit", $("f-limit").value);
  if (cursor) p.set("cursor", cursor);
  return p;
}

function runRow(run) {
  const link = el("a", { href: `#run=${run.run_id}`, text: utc(run.created_at) });
  const row = el("tr", { "data-run-id": run.run_id },
    el("td", { class: "time" }, link),
    el("td", {}, badge(run.status)),
    el("td", { class: "query", text: run.query, title: run.query }),
    modelCell(run.flash),
    modelCell(run.pro),
    el("td", { text: run.client_id ?? dash }),
    el("td", { class: "num", text: run.status === "running" ? dash : ms(run.total_ms) }),
    el("td", { class: "num", text: cost(run.cost_usd) }),
    el("td", { class: "num", text: agreement(run.agreement) }));
  // The whole row opens the run; the link in it is there for the keyboard and new tabs.
  row.addEventListener("click", (e) => {
    if (e.target.closest("a")) return;
    location.hash = `run=${run.run_id}`;
  });
  return row;
}

/** Shows page number `cursors.length` (the last cursor in `cursors`). */
async function loadPage() {
  const index = cursors.length - 1;
  const page = await getJson("/runs", pageParams(cursors[index]));
  nextCursor = page.next_cursor;
  if (index === 0) {
    newestSeen = page.runs.length ? page.runs[0].created_at : null;
    $("newer").hidden = true;
  }
  $("runs").tBodies[0].replaceChildren(...page.runs.map(runRow));
  $("empty").hidden = page.runs.length > 0 || index > 0;
  $("page-label").textContent = `Page ${index + 1}` + (page.runs.length ? ` · ${page.runs.length} runs` : " · no more runs");
  $("first").disabled = index === 0;
  $("prev").disabled = index === 0;
  $("next").disabled = !nextCursor;
}

/** Runs `work` with the list marked busy (`aria-busy`), for assistive tools and tests. */
async function busy(work) {
  const view = $("runs-view");
  view.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    view.removeAttribute("aria-busy");
  }
}

/** Reloads the list from its newest page, and the chart. */
function reload() {
  return busy(async () => {
    cursors = [null];
    statusEl.textContent = "Loading…";
    await Promise.all([loadPage(), loadChart()]);
    statusEl.textContent = "";
  });
}

/** Moves to another page: `change` sets `cursors`, which is put back if the page fails. */
function go(change) {
  return busy(async () => {
    const before = cursors;
    change();
    try {
      await loadPage();
    } catch (e) {
      cursors = before;
      failed(e);
    }
  });
}

// ---- Live refresh ----

function stopLive() {
  if (liveTimer !== null) clearInterval(liveTimer);
  liveTimer = null;
}

/**
 * One refresh: on the newest page the list and the chart are redrawn; on a later page (whose
 * runs do not move, the cursor pins them) only the number of newer runs is said, so the
 * operator's place is kept.
 */
async function refresh() {
  if (token === null || !$("run-view").hidden) return;
  try {
    if (cursors.length === 1) {
      await busy(() => Promise.all([loadPage(), loadChart()]));
    } else {
      const page = await getJson("/runs", pageParams(null));
      const newer = page.runs.filter((r) => newestSeen === null || r.created_at > newestSeen).length;
      const more = newer === page.runs.length && page.next_cursor ? "+" : "";
      $("newer").hidden = newer === 0;
      $("newer").textContent = `${newer}${more} newer run${newer === 1 ? "" : "s"}: show the newest`;
    }
  } catch (e) {
    failed(e);
  }
}

// ---- The chart: runs, failures and agreement over time ----

/** Bucket widths to choose from, in seconds: the smallest that makes at most 30 buckets. */
const BUCKETS_S = [10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400];
/** Statuses counted as failures: a model's answer is missing, and not by the client's choice. */
const FAILED = new Set(["failed", "partial", "interrupted"]);

function bucketLabel(width) {
  if (width < 60) return `${width} s`;
  if (width < 3600) return `${width / 60} min`;
  if (width < 86400) return `${width / 3600} h`;
  return `${width / 86400} d`;
}

/** Groups runs by time: `{width, buckets: [{start, runs, failures, agreement}]}`, oldest first. */
function bucketize(runs) {
  const times = runs.map((r) => Date.parse(r.created_at) / 1000);
  const lo = Math.min(...times);
  const hi = Math.max(...times);
  const width = BUCKETS_S.find((w) => Math.floor(hi / w) - Math.floor(lo / w) < 30) ?? BUCKETS_S[BUCKETS_S.length - 1];
  const first = Math.floor(lo / width);
  const count = Math.floor(hi / width) - first + 1;
  const buckets = Array.from({ length: count }, (_, i) => ({ start: (first + i) * width, runs: 0, failures: 0, sum: 0, measured: 0 }));
  runs.forEach((r, i) => {
    const b = buckets[Math.floor(times[i] / width) - first];
    b.runs++;
    if (FAILED.has(r.status)) b.failures++;
    if (typeof r.agreement === "number") { b.sum += r.agreement; b.measured++; }
  });
  for (const b of buckets) b.agreement = b.measured ? b.sum / b.measured : null;
  return { width, buckets };
}

async function loadChart() {
  const params = new URLSearchParams(filters);
  params.set("limit", String(CHART_RUNS));
  const page = await getJson("/runs", params);
  drawChart(page.runs, page.next_cursor !== null);
}

function drawChart(runs, truncated) {
  const chart = $("chart");
  const W = 900, H = 170, L = 40, R = 40, T = 10, B = 26;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  chart.replaceChildren();
  const caption = $("chart-caption");
  if (runs.length === 0) {
    caption.textContent = "No runs to chart.";
    return;
  }
  const { width, buckets } = bucketize(runs);
  const maxRuns = Math.max(...buckets.map((b) => b.runs));
  const plotW = W - L - R, plotH = H - T - B;
  const slot = plotW / buckets.length;
  const y = (n) => T + plotH - (n / maxRuns) * plotH;
  const ya = (a) => T + plotH - a * plotH;

  chart.append(
    svg("line", { class: "axis", x1: L, y1: T + plotH, x2: W - R, y2: T + plotH }),
    svg("text", { class: "tick", x: L - 6, y: T + 8, "text-anchor": "end" }, String(maxRuns)),
    svg("text", { class: "tick", x: L - 6, y: T + plotH, "text-anchor": "end" }, "0"),
    svg("text", { class: "tick", x: W - R + 6, y: T + 8 }, "1"),
    svg("text", { class: "tick", x: W - R + 6, y: T + plotH }, "0"),
    svg("text", { class: "tick", x: L, y: H - 6 }, `${utc(new Date(buckets[0].start * 1000).toISOString())} UTC`),
    svg("text", { class: "tick", x: W - R, y: H - 6, "text-anchor": "end" },
      `${utc(new Date(buckets[buckets.length - 1].start * 1000).toISOString())}`),
  );
  const points = [];
  buckets.forEach((b, i) => {
    const x = L + i * slot + slot * 0.15;
    const w = Math.max(1, slot * 0.7);
    const g = svg("g", { class: "bucket" });
    const agree = b.agreement == null ? "no agreement measured" : `mean agreement ${b.agreement.toFixed(2)}`;
    g.append(svg("title", {}, `${utc(new Date(b.start * 1000).toISOString())} UTC, ${bucketLabel(width)}: ` +
      `${count(b.runs, "run")}, ${count(b.failures, "failure")}, ${agree}`));
    if (b.runs) g.append(svg("rect", { class: "bar-runs", x, y: y(b.runs), width: w, height: y(0) - y(b.runs) }));
    if (b.failures) g.append(svg("rect", { class: "bar-failures", x, y: y(b.failures), width: w, height: y(0) - y(b.failures) }));
    chart.append(g);
    if (b.agreement != null) points.push([L + i * slot + slot / 2, ya(b.agreement)]);
  });
  if (points.length > 1) {
    chart.append(svg("polyline", { class: "line-agreement", points: points.map((p) => p.join(",")).join(" ") }));
  }
  for (const [px, py] of points) chart.append(svg("circle", { class: "dot-agreement", cx: px, cy: py, r: 3 }));

  const failures = buckets.reduce((n, b) => n + b.failures, 0);
  const n = runs.length;
  const which = truncated ? `the ${n} newest matching runs` : n === 1 ? "the one matching run" : `all ${n} matching runs`;
  caption.textContent = `Runs per ${bucketLabel(width)}: ${which}, ${count(failures, "failure")}. ` +
    (truncated ? `The chart stops at ${CHART_RUNS} runs; narrow the filters to see further back.` : "");
}

// ---- One run ----

/** A `<dl>` of `[term, value]` pairs; a value may be a node. */
function facts(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [term, value] of pairs) {
    dl.append(el("dt", { text: term }), value instanceof Node ? el("dd", {}, value) : el("dd", { text: value }));
  }
  return dl;
}

/**
 * The timings as a timeline: per model a bar from the call's start (both calls start with
 * the run) to its end, with a mark at the first token.
 */
function timeline(run) {
  const models = [["Flash", run.flash], ["Pro", run.pro]].filter(([, t]) => t);
  const span = Math.max(1, run.total_ms, ...models.map(([, t]) => t.latency_ms));
  // R leaves room for the "end … ms" label of the longest bar.
  const W = 900, L = 60, R = 110, rowH = 34, T = 8;
  const H = T + models.length * rowH + 24;
  const x = (t) => L + (t / span) * (W - L - R);
  const root = svg("svg", { class: "timeline", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Timeline of both models" });
  root.append(svg("title", {}, "Each model's call: start, first token and end, in ms from the run's start"));
  models.forEach(([name, t], i) => {
    const top = T + i * rowH;
    const mid = top + 11;
    root.append(
      svg("text", { class: "label", x: 0, y: mid + 4 }, name),
      svg("rect", { class: `span outcome-${t.outcome}`, x: x(0), y: top + 4, width: Math.max(1, x(t.latency_ms) - x(0)), height: 14 }),
      svg("text", { class: "tick", x: x(t.latency_ms) + 4, y: mid + 4 }, `end ${t.latency_ms} ms`),
    );
    if (t.ttft_ms != null) {
      root.append(
        svg("line", { class: "ttft", x1: x(t.ttft_ms), y1: top, x2: x(t.ttft_ms), y2: top + 22 }),
        svg("text", { class: "tick", x: x(t.ttft_ms), y: top + 31, "text-anchor": "middle" }, `first token ${t.ttft_ms} ms`),
      );
    }
  });
  const axisY = T + models.length * rowH + 4;
  root.append(
    svg("line", { class: "axis", x1: x(0), y1: axisY, x2: x(span), y2: axisY }),
    svg("text", { class: "tick", x: x(0), y: axisY + 14 }, "start 0 ms"),
    svg("text", { class: "tick", x: x(span), y: axisY + 14, "text-anchor": "end" }, `run ${run.total_ms} ms`),
  );
  return root;
}

function tokens(t) {
  if (t.input_tokens == null && t.output_tokens == null) return dash;
  return `${t.input_tokens ?? "?"} in / ${t.output_tokens ?? "?"} out`;
}

function modelPanel(name, role, t) {
  const panel = el("section", { class: `answer ${name.toLowerCase()}`, "aria-label": `${name} answer` },
    el("h3", { text: `${name} ` }, el("span", { class: "role", text: role })));
  if (!t) {
    panel.append(el("p", { class: "meta", text: "No trace: the run has no record (it is running, or its process died)." }));
    return panel;
  }
  const outcome = t.deadline ? `${t.outcome} (${t.deadline.replace("_", " ")} deadline)` : t.outcome;
  panel.append(facts([
    ["Model", `${t.provider} · ${t.model}${t.model_version ? ` · ${t.model_version}` : ""}`],
    ["Outcome", el("span", { class: `badge outcome-${t.outcome}`, text: outcome })],
    ["Finish", t.finish_reason ?? dash],
    ["First token", ms(t.ttft_ms)],
    ["End", ms(t.latency_ms)],
    ["Tokens", tokens(t)],
    ["Cost", cost(t.cost_usd)],
  ]));
  if (t.error_type || t.error_message) {
    panel.append(el("p", { class: "error", role: "alert", text: `${t.error_type ?? "error"}: ${t.error_message ?? ""}` }));
  }
  const text = el("div", { class: "text" });
  if (t.text) renderMarkdown(text, t.text);
  else text.append(el("p", { class: "muted", text: "(no text)" }));
  panel.append(text);
  return panel;
}

function runPage(run) {
  const back = el("a", { href: "#", class: "back", text: "← All runs" });
  const page = el("article", { class: "run-page" }, back,
    el("h2", {}, "Run ", el("code", { text: run.run_id }), " ", badge(run.status)));
  page.append(facts([
    ["Created", `${utc(run.created_at)} UTC`],
    ["Total", run.status === "running" ? dash : ms(run.total_ms)],
    ["Cost", cost(run.cost_usd)],
    ["Agreement", agreement(run.agreement)],
    ["Client", run.client_id ?? dash],
    ["Request id", run.client_request_id ?? dash],
    ["Instance", run.instance_id ?? dash],
    ["Version", run.service_version],
  ]));
  const asked = el("section", { class: "asked-box" }, el("h3", { text: "Query" }), el("p", { class: "asked", text: run.query }));
  if (run.system) asked.append(el("details", {}, el("summary", { text: "System prompt" }), el("p", { class: "asked", text: run.system })));
  if (run.messages && run.messages.length) {
    const list = el("ol", { class: "messages" }, ...run.messages.map((m) =>
      el("li", {}, el("strong", { text: `${m.role}: ` }), el("span", { class: "asked", text: m.content }))));
    asked.append(el("details", {}, el("summary", { text: `Conversation (${run.messages.length} messages)` }), list));
  }
  page.append(asked);
  if (run.flash || run.pro) page.append(el("section", {}, el("h3", { text: "Timeline" }), timeline(run)));
  page.append(el("div", { class: "answers" },
    modelPanel("Flash", "preview", run.flash), modelPanel("Pro", "final answer", run.pro)));
  return page;
}

async function showRun(id) {
  $("runs-view").hidden = true;
  const view = $("run-view");
  view.hidden = false;
  view.replaceChildren(el("p", { class: "muted", text: "Loading the run…" }));
  try {
    const run = await getJson(`/runs/${encodeURIComponent(id)}`);
    view.replaceChildren(runPage(run));
    statusEl.textContent = "";
    document.title = `duet: run ${run.run_id}`;
  } catch (e) {
    if (e.status === STALE) return;
    view.replaceChildren(el("a", { href: "#", class: "back", text: "← All runs" }));
    failed(e);
  }
}

// ---- Navigation: the hash says which view, the token decides whether there is one ----

function runIdInHash() {
  const m = /^#run=([0-9A-Fa-f-]{1,64})$/.exec(location.hash);
  return m ? m[1] : null;
}

/** Shows what the hash asks for; the list keeps its page and filters across visits to runs. */
async function route() {
  if (token === null) return;
  const id = runIdInHash();
  if (id) return showRun(id);
  document.title = "duet: operators' console";
  $("run-view").hidden = true;
  $("run-view").replaceChildren();
  $("runs-view").hidden = false;
}

window.addEventListener("hashchange", route);

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const typed = $("token").value.trim();
  if (!typed) return;
  token = typed;
  $("token").value = "";
  filters = readFilters();
  try {
    await reload();
  } catch (err) {
    failed(err);
    return;
  }
  $("login").hidden = true;
  $("runs-view").hidden = false;
  await route();
});

$("filters").addEventListener("submit", async (e) => {
  e.preventDefault();
  filters = readFilters();
  try {
    await reload();
  } catch (err) {
    failed(err);
  }
});

$("clear").addEventListener("click", () => {
  $("filters").reset();
  $("filters").requestSubmit();
});

$("f-limit").addEventListener("change", () => $("filters").requestSubmit());
$("next").addEventListener("click", () => go(() => { cursors = [...cursors, nextCursor]; }));
$("prev").addEventListener("click", () => go(() => { cursors = cursors.slice(0, -1); }));
$("first").addEventListener("click", () => go(() => { cursors = [null]; }));
$("newer").addEventListener("click", () => go(() => { cursors = [null]; }));
$("forget").addEventListener("click", () => forget("The token is forgotten."));

$("live").addEventListener("change", () => {
  stopLive();
  if ($("live").checked) liveTimer = setInterval(refresh, LIVE_EVERY_MS);
});

// Whether the admin API is on, asked without a token (a request without one is not counted
// as a wrong guess): 404 says it is off, 401 that it wants the token.
(async () => {
  try {
    await getJson("/runs", new URLSearchParams({ limit: "1" }));
  } catch (e) {
    if (e.status === 404) return adminOff(e.message);
    if (e.status !== 401 && e.status !== 429) statusEl.textContent = e.message;
  }
  $("login").hidden = false;
  if (runIdInHash()) statusEl.textContent = "Type the admin token to open this run.";
  $("token").focus();
})();
