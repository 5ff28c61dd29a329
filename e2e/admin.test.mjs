// The operators' console (GET /admin) as an operator uses it, in real headless Chromium
// (Debian's package, driven by playwright-core), against a real duet with a SQLite audit
// database. The models are a small OpenAI-compatible upstream in this file, so that runs can
// fail on purpose and an answer can carry Markdown and hostile HTML; everything between
// (duet's provider, the audit writer, GET /runs, the page) is the real thing.
//
// Every test also checks that the admin token never reaches a URL, the page's history,
// cookies or any browser storage, and that it does go out as the Authorization header.
//
// Run: (cd e2e && npm ci && npm test); needs target/debug/duet (cargo build) and
// /usr/bin/chromium. Screenshots go to ../test-output/; with UPDATE_SCREENSHOTS=1 the README's
// copies in ../docs/img/ are rewritten too (so a plain test run leaves the tree clean).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { createInterface } from "node:readline";
import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const binary = process.env.DUET_BIN || join(root, "target", "debug", "duet");
const imgDirs = [join(root, "test-output")];
if (process.env.UPDATE_SCREENSHOTS === "1") imgDirs.push(join(root, "docs", "img"));
for (const dir of imgDirs) mkdirSync(dir, { recursive: true });
async function screenshot(page, name, options = {}) {
  for (const dir of imgDirs) await page.screenshot({ path: join(dir, name), ...options });
}

const TOKEN = "e2e-console-token-5f1c9a";
const RUNS = 64;
/** The queries that fail or answer in Markdown: found by a marker in the question. */
const PRO_FAILS = "[pro-fails]";
const BOTH_FAIL = "[both-fail]";
const MARKDOWN = "[markdown]";

// Markdown with hostile HTML in it: rendered, the list, the code and the table must show, and
// nothing may run (a dialog fails the test) or load.
const MARKDOWN_ANSWER = [
  "## Steps",
  "",
  "1. Measure **first**",
  "2. Then `cache` it",
  "",
  "| model | ms |",
  "|---|---|",
  "| flash | 20 |",
  "",
  "```rust",
  "fn main() {}",
  "```",
  "",
  "<img src=x onerror=\"alert('img')\"> <script>alert('script')</script>",
  "[click](javascript:alert('link'))",
].join("\n");

// ---- A small OpenAI-compatible upstream (the wire shape of tests/fixtures/wire/openai_*) ----

function answerText(model, question) {
  if (question.includes(MARKDOWN)) return MARKDOWN_ANSWER;
  return model === "fake-flash"
    ? `Quick take on “${question}”: start from the evidence you have.`
    : `Considered answer on “${question}”: measure first, then decide which trade-off leads.`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function startUpstream() {
  const server = createServer((req, res) => {
    let raw = "";
    req.on("data", (c) => { raw += c; });
    req.on("end", async () => {
      const body = JSON.parse(raw);
      const question = body.messages.filter((m) => m.role === "user").at(-1).content;
      const model = body.model;
      if (question.includes(BOTH_FAIL) || (question.includes(PRO_FAILS) && model === "fake-pro")) {
        res.writeHead(400, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: { message: "This model's maximum context length is 8 tokens", type: "invalid_request_error", param: "messages", code: "context_length_exceeded" } }));
        return;
      }
      res.writeHead(200, { "content-type": "text/event-stream" });
      const chunk = (delta, finish = null) => ({ id: "chatcmpl-e2e", object: "chat.completion.chunk", created: 1759312284, model,
        choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], usage: null });
      const send = (v) => res.write(`data: ${JSON.stringify(v)}\n\n`);
      await sleep(model === "fake-flash" ? 15 : 45);
      send(chunk({ role: "assistant", content: "" }));
      const text = answerText(model, question);
      for (let i = 0; i < text.length; i += 16) {
        send(chunk({ content: text.slice(i, i + 16) }));
        await sleep(model === "fake-flash" ? 2 : 6);
      }
      send(chunk({}, "stop"));
      const completion = Math.ceil(text.length / 4);
      send({ id: "chatcmpl-e2e", object: "chat.completion.chunk", created: 1759312284, model, choices: [],
        usage: { prompt_tokens: 12, completion_tokens: completion, total_tokens: 12 + completion } });
      res.end("data: [DONE]\n\n");
    });
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({ server, url: `http://127.0.0.1:${server.address().port}/v1` })));
}

// ---- duet ----

function startDuet(env) {
  const child = spawn(binary, [], {
    cwd: mkdtempSync(join(tmpdir(), "duet-e2e-console-")),
    env: { PATH: process.env.PATH, BIND_ADDR: "127.0.0.1:0", LOG_FORMAT: "json", RUST_LOG: "warn,duet=info", ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      try {
        const v = JSON.parse(line);
        if (v.message === "listening") resolve({ child, url: `http://${v.addr}/` });
      } catch (_) { /* not JSON */ }
    });
    child.on("exit", (code) => reject(new Error(`duet exited early with ${code}`)));
  });
}

const admin = { Authorization: `Bearer ${TOKEN}` };

async function listRuns(url, params = "") {
  const resp = await fetch(new URL(`runs?limit=500${params}`, url), { headers: admin });
  assert.equal(resp.status, 200);
  return (await resp.json()).runs;
}

/** Runs `question` through duet and returns its run id. */
async function ask(url, question) {
  const resp = await fetch(new URL("query", url), {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ query: question }),
  });
  // Both models failing is a 502 for /query; the run is audited all the same.
  assert.equal(resp.status, question.includes(BOTH_FAIL) ? 502 : 200, `POST /query ${question}`);
  return resp.headers.get("x-run-id");
}

/** Waits until every run asked so far is in the database with its record. */
async function audited(url, count) {
  for (let i = 0; i < 200; i++) {
    const runs = await listRuns(url);
    if (runs.length >= count && runs.every((r) => r.status !== "running")) return runs;
    await sleep(50);
  }
  throw new Error(`fewer than ${count} runs were audited`);
}

const question = (i) => {
  const n = String(i).padStart(2, "0");
  if (i === 7) return `${PRO_FAILS} question ${n}: why do caches go stale?`;
  if (i === 13) return `${BOTH_FAIL} question ${n}: how long is a piece of string?`;
  if (i === 21) return `${MARKDOWN} question ${n}: list the steps as Markdown`;
  return `question ${n}: how should we pick a database?`;
};

let upstream;
let duet;
let offDuet;
let browser;
/** The runs seeded, as GET /runs lists them (newest first). */
let seeded;

before(async () => {
  upstream = await startUpstream();
  const dir = mkdtempSync(join(tmpdir(), "duet-e2e-console-db-"));
  duet = await startDuet({
    ADMIN_TOKEN: TOKEN,
    DATABASE_URL: `sqlite://${join(dir, "duet.db")}`,
    AUDIT_DEADLETTER_PATH: join(dir, "deadletter.jsonl"),
    FLASH_PROVIDER: "openai", FLASH_MODEL: "fake-flash", FLASH_BASE_URL: upstream.url, FLASH_API_KEY: "sk-e2e",
    PRO_PROVIDER: "openai", PRO_MODEL: "fake-pro", PRO_BASE_URL: upstream.url, PRO_API_KEY: "sk-e2e",
    FLASH_PRICE_INPUT_PER_MTOK: "0.30", FLASH_PRICE_OUTPUT_PER_MTOK: "2.50",
    PRO_PRICE_INPUT_PER_MTOK: "1.25", PRO_PRICE_OUTPUT_PER_MTOK: "10",
  });
  offDuet = await startDuet({ FLASH_PROVIDER: "simulated", PRO_PROVIDER: "simulated" });
  // Four at a time: quick, and still several distinct creation times.
  for (let i = 1; i <= RUNS; i += 4) {
    await Promise.all([0, 1, 2, 3].filter((k) => i + k <= RUNS).map((k) => ask(duet.url, question(i + k))));
  }
  seeded = await audited(duet.url, RUNS);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  duet?.child.kill("SIGTERM");
  offDuet?.child.kill("SIGTERM");
  upstream?.server.close();
});

/**
 * Opens the console of `base` in a fresh browser context and runs `fn`; then checks that
 * nothing failed on the page and that the token went nowhere but the Authorization header.
 */
async function withConsole(fn, { base = duet.url, path = "admin" } = {}) {
  // Chrome logs every 4xx answer as an error: the console's first request, without a token,
  // gets 401 (or 404 with the admin API off), and a wrong token 401. Nothing else may show.
  const expected = /^Failed to load resource: the server responded with a status of (401 \(Unauthorized\)|404 \(Not Found\))$/;
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: "light" });
  const page = await context.newPage();
  const problems = [];
  const requests = [];
  const urls = [];
  page.on("pageerror", (e) => problems.push(e.message));
  page.on("console", (m) => { if (m.type() === "error" && !expected.test(m.text())) problems.push(m.text()); });
  // A dialog means model text ran script: always a failure.
  page.on("dialog", (d) => { problems.push(`dialog: ${d.message()}`); d.dismiss().catch(() => {}); });
  page.on("request", (r) => requests.push({ url: r.url(), auth: r.headers().authorization ?? null }));
  page.on("framenavigated", (f) => { if (f === page.mainFrame()) urls.push(f.url()); });
  try {
    await page.goto(new URL(path, base).href);
    await fn(page, { requests, urls, context });
    assert.deepEqual(problems, [], "no script errors, CSP violations or dialogs");
    await assertTokenKept(page, context, requests, urls);
  } finally {
    await context.close();
  }
}

async function assertTokenKept(page, context, requests, urls) {
  urls.push(page.url());
  for (const u of [...urls, ...requests.map((r) => r.url)]) {
    assert.ok(!u.includes(TOKEN), `the token is in a URL: ${u}`);
  }
  const state = await page.evaluate(async () => ({
    local: Object.entries(localStorage),
    session: Object.entries(sessionStorage),
    cookie: document.cookie,
    databases: (await indexedDB.databases()).map((d) => d.name),
    html: document.documentElement.outerHTML,
    fields: [...document.querySelectorAll("input")].map((i) => i.value),
  }));
  assert.deepEqual(state.local, [], "nothing in localStorage");
  assert.deepEqual(state.session, [], "nothing in sessionStorage");
  assert.equal(state.cookie, "", "no cookies");
  assert.deepEqual(state.databases, [], "no IndexedDB");
  assert.ok(!state.html.includes(TOKEN), "the token is not in the document");
  assert.ok(!state.fields.includes(TOKEN), "the token is not left in a field");
  const stored = JSON.stringify(await context.storageState());
  assert.ok(!stored.includes(TOKEN), "the token is not in the browser's stored state");
}

async function logIn(page, token = TOKEN) {
  await page.getByLabel("Admin token").fill(token);
  await page.getByRole("button", { name: "Open the console" }).click();
}

const rows = (page) => page.locator("#runs tbody tr");
const rowIds = (page) => rows(page).evaluateAll((trs) => trs.map((tr) => tr.dataset.runId));

/** Waits until the list has shown what it was asked for (it is `aria-busy` meanwhile). */
const settled = (page) => page.locator("#runs-view:not([aria-busy])").waitFor();

async function loggedIn(page, perPage = "50") {
  await logIn(page);
  await rows(page).first().waitFor();
  await settled(page);
  if (perPage !== "50") {
    await page.getByLabel("Per page").selectOption(perPage);
    await settled(page);
  }
}

/** Applies filters through the form and waits for the table to show their result. */
async function filter(page, { status = "", q = "" }) {
  await page.getByLabel("Status").selectOption(status);
  await page.getByLabel("Query contains").fill(q);
  await page.getByRole("button", { name: "Apply" }).click();
  await settled(page);
}

// ---- The tests ----

test("without ADMIN_TOKEN the console loads and says the admin API is off", async () => {
  await withConsole(async (page) => {
    await page.locator("#status").filter({ hasText: "admin API is off" }).waitFor();
    assert.match(await page.locator("#status").textContent(), /^The admin API is off: set ADMIN_TOKEN/);
    assert.equal(await page.locator("#login").isVisible(), false, "no token is asked for");
    assert.equal(await page.locator("#runs-view").isVisible(), false);
  }, { base: offDuet.url });
});

test("a wrong token is refused with a clear message, and the right one opens the console", async () => {
  await withConsole(async (page, { requests }) => {
    await logIn(page, "not-the-token");
    await page.locator("#status").filter({ hasText: "The token was refused" }).waitFor();
    assert.equal(await page.locator("#login").isVisible(), true, "asked again");
    assert.equal(await page.getByLabel("Admin token").inputValue(), "", "the wrong token is not kept");
    assert.equal(await page.locator("#runs-view").isVisible(), false);
    await loggedIn(page);
    assert.equal(await page.locator("#login").isVisible(), false);
    // The probe at load went without a token (a request without one is no wrong guess).
    const runs = requests.filter((r) => new URL(r.url).pathname === "/runs");
    assert.equal(runs[0].auth, null);
    assert.equal(runs.at(-1).auth, `Bearer ${TOKEN}`);
  });
});

test("the runs table: newest first, the chart, filters by status and by query text", async () => {
  await withConsole(async (page) => {
    await loggedIn(page, "25");
    await page.locator("#chart rect.bar-runs").first().waitFor();
    assert.equal(await rows(page).count(), 25);
    assert.deepEqual(await rowIds(page), seeded.slice(0, 25).map((r) => r.run_id), "newest first, as GET /runs");
    const times = await rows(page).locator("td.time").allTextContents();
    assert.deepEqual(times, [...times].sort().reverse());
    const first = rows(page).first();
    assert.match(await first.locator("td.query").textContent(), /^question \d\d: /);
    assert.equal(await first.locator("td").nth(1).textContent(), "ok");
    assert.match(await first.locator("td").nth(7).textContent(), /^\$0\.\d{6}$/, "cost");
    assert.equal(await first.locator("td").nth(8).textContent(), seeded[0].agreement == null ? "—" : seeded[0].agreement.toFixed(2));
    // The chart counts every seeded run and both failures (the failed and the partial run).
    assert.match(await page.locator("#chart-caption").textContent(), new RegExp(`all ${RUNS} matching runs, 2 failures`));
    assert.ok(await page.locator("#chart rect.bar-failures").count() >= 1);
    await page.evaluate(() => document.fonts.ready);
    await screenshot(page, "console-runs.png");

    await filter(page, { status: "failed" });
    assert.equal(await rows(page).count(), 1);
    assert.match(await rows(page).first().locator("td.query").textContent(), /both-fail/);
    assert.match(await page.locator("#chart-caption").textContent(), /the one matching run, 1 failure\./);

    await filter(page, { status: "partial" });
    assert.equal(await rows(page).count(), 1);
    assert.match(await rows(page).first().locator("td.query").textContent(), /pro-fails/);
    assert.equal(await rows(page).first().locator("td").nth(4).textContent(), "error", "Pro's outcome");

    await filter(page, { status: "", q: "question 3" });
    const shown = await rows(page).locator("td.query").allTextContents();
    assert.equal(shown.length, 10, "questions 30 to 39");
    assert.ok(shown.every((q) => q.includes("question 3")));

    await filter(page, { q: "nothing like this" });
    assert.equal(await rows(page).count(), 0);
    assert.equal(await page.locator("#empty").isVisible(), true);
  });
});

test("the chart: runs and failures per bucket, and the mean agreement where it is known", async () => {
  // duet's answers here carry no agreement yet, so the chart's page of runs is answered by
  // the test: three 10-second buckets, agreement known in two of them.
  const t0 = Date.parse("2026-12-01T10:00:00Z");
  const at = (s) => new Date(t0 + s * 1000).toISOString();
  const summary = (i, s, status, agreement) => ({ run_id: `01a23c0b-0000-7000-8000-${String(i).padStart(12, "0")}`,
    created_at: at(s), status, total_ms: 100, query: `q${i}`, client_id: null, cost_usd: null, agreement,
    flash: { outcome: "ok", model_name: "f" }, pro: { outcome: status === "ok" ? "ok" : "error", model_name: "p" } });
  const runs = [
    summary(1, 25, "ok", 0.9), summary(2, 24, "partial", 0.5), summary(3, 21, "ok", null),
    summary(4, 12, "failed", null), summary(5, 11, "cancelled", null),
    summary(6, 3, "ok", 0.2), summary(7, 2, "interrupted", null),
  ];
  await withConsole(async (page) => {
    await loggedIn(page);
    await page.route((u) => u.pathname === "/runs" && u.searchParams.get("limit") === "500", (route) =>
      route.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify({ runs, next_cursor: "more" }) }));
    await page.getByRole("button", { name: "Apply" }).click();
    await settled(page);
    const caption = await page.locator("#chart-caption").textContent();
    assert.match(caption, /^Runs per 10 s: the 7 newest matching runs, 3 failures\. The chart stops at 500 runs/);
    assert.equal(await page.locator("#chart g.bucket").count(), 3);
    const titles = await page.locator("#chart g.bucket title").allTextContents();
    assert.match(titles[0], /10:00:00 UTC, 10 s: 2 runs, 1 failure, mean agreement 0\.20$/);
    assert.match(titles[1], /10:00:10 UTC, 10 s: 2 runs, 1 failure, no agreement measured$/);
    assert.match(titles[2], /10:00:20 UTC, 10 s: 3 runs, 1 failure, mean agreement 0\.70$/);
    assert.equal(await page.locator("#chart rect.bar-runs").count(), 3);
    assert.equal(await page.locator("#chart rect.bar-failures").count(), 3);
    assert.equal(await page.locator("#chart circle.dot-agreement").count(), 2);
    assert.equal(await page.locator("#chart polyline.line-agreement").count(), 1);
  });
});

test("pages: Older shows the next runs, none repeated, and Newer goes back", async () => {
  await withConsole(async (page) => {
    await loggedIn(page, "25");
    const seen = [];
    for (const expected of [25, 25, RUNS - 50]) {
      const ids = await rowIds(page);
      assert.equal(ids.length, expected);
      seen.push(...ids);
      if (seen.length < RUNS) {
        const answered = page.waitForResponse((r) => new URL(r.url()).searchParams.has("cursor"));
        await page.getByRole("button", { name: "Older →" }).click();
        await answered;
        await page.locator("#page-label").filter({ hasText: `Page ${seen.length / 25 + 1}` }).waitFor();
      }
    }
    assert.equal(new Set(seen).size, RUNS, "no run twice");
    assert.deepEqual(seen, seeded.map((r) => r.run_id), "every run, in order");
    assert.equal(await page.getByRole("button", { name: "Older →" }).isDisabled(), true, "the last page");
    await page.getByRole("button", { name: "← Newer" }).click();
    await page.locator("#page-label").filter({ hasText: "Page 2" }).waitFor();
    assert.deepEqual(await rowIds(page), seen.slice(25, 50));
  });
});

test("a run's page: both answers side by side, Markdown rendered safely, timeline, tokens, cost, outcome", async () => {
  await withConsole(async (page, { urls }) => {
    await loggedIn(page);
    await filter(page, { q: MARKDOWN });
    await rows(page).first().locator("td.query").click();
    const run = page.locator(".run-page");
    await run.waitFor();
    const id = seeded.find((r) => r.query.includes(MARKDOWN)).run_id;
    assert.equal(new URL(page.url()).hash, `#run=${id}`);
    assert.ok(urls.some((u) => u.endsWith(`#run=${id}`)));

    const flash = run.locator(".answer.flash");
    const pro = run.locator(".answer.pro");
    // Side by side: same row, Flash on the left.
    const [fb, pb] = [await flash.boundingBox(), await pro.boundingBox()];
    assert.ok(Math.abs(fb.y - pb.y) < 2 && fb.x + fb.width <= pb.x, "side by side");
    for (const panel of [flash, pro]) {
      const text = panel.locator(".text");
      assert.equal(await text.locator("h2").textContent(), "Steps");
      assert.equal(await text.locator("ol > li").count(), 2);
      assert.equal(await text.locator("pre code").textContent(), "fn main() {}\n");
      assert.equal(await text.locator("table td").first().textContent(), "flash");
      // The hostile HTML is shown as text; nothing of it became an element or a handler.
      assert.match(await text.textContent(), /<script>alert\('script'\)<\/script>/);
      assert.equal(await text.locator("script, img, [onerror]").count(), 0);
      const hrefs = await text.locator("a").evaluateAll((as) => as.map((a) => a.getAttribute("href")));
      assert.ok(hrefs.every((h) => h === null || !/^javascript:/i.test(h)), `no script links: ${hrefs}`);
      assert.match(await panel.textContent(), /ok/);
    }
    // Nothing anywhere in the document can run: no handler attribute, no script but the
    // page's own four (marked, DOMPurify, markdown.js, admin.js).
    const handlers = await page.evaluate(() => [...document.querySelectorAll("*")]
      .flatMap((e) => [...e.attributes].filter((a) => /^on/i.test(a.name)).map((a) => `${e.tagName} ${a.name}`)));
    assert.deepEqual(handlers, []);
    assert.equal(await page.evaluate(() => document.scripts.length), 4);
    const record = await (await fetch(new URL(`runs/${id}`, duet.url), { headers: admin })).json();
    const proFacts = await pro.locator(".facts").textContent();
    assert.ok(proFacts.includes(`${record.pro.input_tokens} in / ${record.pro.output_tokens} out`), proFacts);
    assert.ok(proFacts.includes(`$${record.pro.cost_usd.toFixed(6)}`), proFacts);
    assert.ok(proFacts.includes(`First token${record.pro.ttft_ms} ms`), proFacts);
    assert.ok(proFacts.includes("openai · fake-pro"), proFacts);
    const runFacts = await page.locator(".run-page > .facts").textContent();
    assert.ok(runFacts.includes(`Total${record.total_ms} ms`), runFacts);
    assert.ok(runFacts.includes(`Cost$${record.cost_usd.toFixed(6)}`), runFacts);
    assert.ok(runFacts.includes("Agreement"), runFacts);

    // The timeline: a bar per model ending at its latency, a mark at its first token.
    const timeline = run.locator("svg.timeline");
    assert.equal(await timeline.locator("rect.span").count(), 2);
    assert.equal(await timeline.locator("line.ttft").count(), 2);
    const labels = await timeline.locator("text").allTextContents();
    for (const t of [record.flash, record.pro]) {
      assert.ok(labels.includes(`end ${t.latency_ms} ms`), labels.join("|"));
      assert.ok(labels.includes(`first token ${t.ttft_ms} ms`), labels.join("|"));
    }
    await page.evaluate(() => document.fonts.ready);
    await screenshot(page, "console-run.png", { fullPage: true });

    // Back to the list, where it was.
    await page.getByRole("link", { name: "← All runs" }).click();
    await page.locator("#runs-view").waitFor();
    assert.equal(await rows(page).count(), 1, "the filter is kept");
  });
});

test("a failed model's error and a partial run's outcome are shown on its page", async () => {
  const partial = seeded.find((r) => r.query.includes(PRO_FAILS));
  await withConsole(async (page) => {
    await logIn(page);
    await page.locator(".run-page").waitFor();
    const pro = page.locator(".answer.pro");
    assert.equal(await pro.locator(".badge").textContent(), "error");
    assert.match(await pro.locator(".error").textContent(), /maximum context length/);
    assert.match(await page.locator(".answer.flash .text").textContent(), /^Quick take on/);
    assert.equal(await page.locator(".run-page h2 .badge").textContent(), "partial");
    // A run's page opened by its link, before the token: the token is asked for first.
  }, { path: `admin#run=${partial.run_id}` });
});

test("the token is sent as the header only: never in a URL, the history or storage", async () => {
  await withConsole(async (page, { requests, urls }) => {
    await loggedIn(page, "25");
    await page.getByRole("button", { name: "Older →" }).click();
    await page.locator("#page-label").filter({ hasText: "Page 2" }).waitFor();
    await rows(page).first().locator("td.query").click();
    await page.locator(".run-page").waitFor();
    await page.goBack();
    await page.locator("#runs-view").waitFor();
    const admin = requests.filter((r) => /^\/runs/.test(new URL(r.url).pathname));
    assert.ok(admin.length >= 5, "list, chart, page 2, a run");
    // Every admin request after the probe carries the token, as a header.
    for (const r of admin.slice(1)) assert.equal(r.auth, `Bearer ${TOKEN}`, r.url);
    assert.ok(urls.length >= 3, "the navigations were seen");
    // The form cannot leak it either: its field has no name to be submitted by.
    assert.equal(await page.locator("#token").getAttribute("name"), null);
    // Forgetting it takes what it showed along.
    await page.getByRole("button", { name: "Forget the token" }).click();
    await page.locator("#login").waitFor();
    assert.equal(await rows(page).count(), 0);
    assert.equal(await page.locator("#runs-view").isVisible(), false);
    // withConsole checks URLs, history, storage, cookies, IndexedDB and the document.
  });
});

test("an answer that comes back after Forget is not shown", async () => {
  await withConsole(async (page) => {
    await loggedIn(page);
    // Hold the next list request until the token has been forgotten, then let it answer.
    let release;
    const held = new Promise((r) => { release = r; });
    let seen;
    const asked = new Promise((r) => { seen = r; });
    await page.route(/\/runs\?/, async (route) => {
      seen();
      await held;
      await route.continue();
    });
    await page.getByRole("button", { name: "Older →" }).click();
    await asked;
    await page.getByRole("button", { name: "Forget the token" }).click();
    await page.locator("#login").waitFor();
    release();
    const answered = page.waitForResponse(/\/runs\?/);
    await answered;
    await sleep(300);
    assert.equal(await rows(page).count(), 0, "the late page is not drawn");
    assert.equal(await page.locator("#chart").evaluate((c) => c.childElementCount), 0);
    assert.equal(await page.locator("#runs-view").isVisible(), false);
    await page.unroute(/\/runs\?/);
  });
});

test("live refresh: new runs appear on the newest page; a later page keeps its place", async () => {
  await withConsole(async (page) => {
    await loggedIn(page, "25");
    await page.getByLabel("Live refresh").check();
    const id = await ask(duet.url, "question live: does the console see me?");
    await page.locator(`#runs tbody tr[data-run-id="${id}"]`).waitFor({ timeout: 12000 });
    assert.equal(await rowIds(page).then((ids) => ids[0]), id, "on top");

    await page.getByRole("button", { name: "Older →" }).click();
    await page.locator("#page-label").filter({ hasText: "Page 2" }).waitFor();
    const pageTwo = await rowIds(page);
    const id2 = await ask(duet.url, "question live 2: and me?");
    await page.locator("#newer").filter({ hasText: "1 newer run:" }).waitFor({ timeout: 12000 });
    assert.deepEqual(await rowIds(page), pageTwo, "the page shown did not move");
    await page.locator("#newer").click();
    await page.locator("#page-label").filter({ hasText: "Page 1" }).waitFor();
    await settled(page);
    const top = await rowIds(page);
    assert.deepEqual(top.slice(0, 2), [id2, id], "the newest first");
    assert.equal(await page.locator("#newer").isVisible(), false);
  });
});
