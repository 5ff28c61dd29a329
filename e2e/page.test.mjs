// The page as a person sees it, in real headless Chromium (Debian's package, driven by
// playwright-core), against a real duet with the simulated providers. Where an answer must
// hold Markdown or hostile HTML, which the simulated models do not write, the test answers
// the page's POST itself with an event stream (route.fulfill): the page's own code still
// parses, renders and sanitizes it.
//
// Run: (cd e2e && npm ci && npm test); needs target/debug/duet (cargo build) and
// /usr/bin/chromium. Screenshots go to ../test-output/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const binary = process.env.DUET_BIN || join(root, "target", "debug", "duet");
const outDir = join(root, "test-output");
mkdirSync(outDir, { recursive: true });

// Starts duet on a free port and resolves with its address, read from the "listening" log line.
function startDuet(env) {
  const child = spawn(binary, [], {
    cwd: mkdtempSync(join(tmpdir(), "duet-e2e-")),
    env: { PATH: process.env.PATH, BIND_ADDR: "127.0.0.1:0", LOG_FORMAT: "json", ...env },
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

async function withPage(env, fn, expectedConsole = []) {
  const { child, url } = await startDuet(env);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    const problems = [];
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => {
      if (m.type() === "error" && !expectedConsole.some((re) => re.test(m.text()))) problems.push(m.text());
    });
    // A dialog means model text ran script: always a failure.
    page.on("dialog", (d) => { problems.push(`dialog: ${d.message()}`); d.dismiss().catch(() => {}); });
    await page.goto(url);
    await fn(page, url);
    assert.deepEqual(problems, [], "no script errors or CSP violations");
  } finally {
    await browser.close();
    child.kill("SIGTERM");
  }
}

const fast = {
  SIMULATED_FLASH_TTFT_S: "0.2", SIMULATED_FLASH_TOKEN_S: "0.01",
  SIMULATED_PRO_TTFT_S: "0.8", SIMULATED_PRO_TOKEN_S: "0.01",
};
const ADMIN_TOKEN = "e2e-admin-token";

const turns = (page) => page.locator(".turn");

async function ask(page, question) {
  await page.getByLabel("Your question").fill(question);
  await page.getByRole("button", { name: "Ask both models" }).click();
}

// Waits until turn `i` (from 0) has ended, however it ended; the page marks it then.
async function ended(page, i) {
  await page.locator(".turn[data-outcome]").nth(i).waitFor({ timeout: 15000 });
  // The last text is drawn on the next animation frame.
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
}

// The audit record of a run, once written (the writer works in the background, so it may
// come a moment after `done`).
async function auditRecord(url, runId) {
  for (let attempt = 0; attempt < 100; attempt++) {
    const resp = await fetch(new URL(`runs/${runId}`, url), { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } });
    if (resp.status === 200) return resp.json();
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`run ${runId} was never audited`);
}

// Records the JSON body of every POST the page makes to /query/stream.
function postedBodies(page) {
  const bodies = [];
  page.on("request", (r) => {
    if (r.method() === "POST" && new URL(r.url()).pathname === "/query/stream") bodies.push(r.postDataJSON());
  });
  return bodies;
}

// An event stream as duet writes it, for answers the simulated models cannot give: a start,
// each text in deltas of 7 characters, both answers, done. `eol` picks the line ends; a
// keep-alive comment sits between the deltas and the answers.
const SCRIPTED_RUN = "01a23abd-0000-7000-8000-00000000beef";
function scriptedStream(flashText, proText, eol = "\r\n") {
  const events = [["start", { models: { flash: { provider: "scripted", model: "f" }, pro: { provider: "scripted", model: "p" } } }]];
  for (const [model, text] of [["flash", flashText], ["pro", proText]]) {
    for (let i = 0; i < text.length; i += 7) events.push(["delta", { model, text: text.slice(i, i + 7) }]);
  }
  const answer = (model, text) => ({ model, provider: "scripted", model_name: `scripted-${model}`, model_version: null,
    text, finish_reason: "stop", latency_ms: 5, ttft_ms: 1, usage: { input_tokens: 1, output_tokens: 2 } });
  events.push(["flash", answer("flash", flashText)], ["pro", answer("pro", proText)],
    ["done", { status: "ok", flash: "ok", pro: "ok", total_ms: 9 }]);
  return events.map(([name, data], seq) => {
    const frame = [`event: ${name}`, `id: ${SCRIPTED_RUN}:${seq}`, `data: ${JSON.stringify({ run_id: SCRIPTED_RUN, ...data })}`, "", ""].join(eol);
    return name === "flash" ? `: keep-alive${eol}${eol}${frame}` : frame;
  }).join("");
}

// Answers the page's next POST /query/stream with `body` instead of the service.
async function scriptAnswer(page, body) {
  await page.route("**/query/stream", (route) => route.request().method() === "POST"
    ? route.fulfill({ status: 200, headers: { "content-type": "text/event-stream", "x-run-id": SCRIPTED_RUN }, body })
    : route.continue());
}

test("a question streams into both panels and the run ends", async () => {
  await withPage(fast, async (page) => {
    await ask(page, "Why is the sky blue?");
    const turn = turns(page).first();
    await turn.locator(".flash .text").filter({ hasText: "Quick take on" }).waitFor();
    await page.locator("#status").filter({ hasText: "Done" }).waitFor({ timeout: 15000 });
    await ended(page, 0);
    assert.equal(await turn.locator("[data-question]").textContent(), "Why is the sky blue?");
    const flash = await turn.locator(".flash .text").textContent();
    const pro = await turn.locator(".pro .text").textContent();
    assert.match(flash, /^Quick take on “Why is the sky blue\?”:/);
    assert.match(pro, /^Considered answer on “Why is the sky blue\?”:/);
    assert.equal(await turn.locator(".pro .text > p").count(), 1, "the answer is rendered, as a paragraph");
    assert.match(await turn.locator(".pro .meta").textContent(), /simulated · simulated-pro · \d+ ms/);
    assert.match(await turn.locator("[data-run-id]").textContent(), /^[0-9a-f-]{36}$/);
    assert.match(await page.locator("#status").textContent(), /Done \(flash ok, pro ok, \d+ ms\)/);
    assert.equal(await page.getByRole("button", { name: "Ask both models" }).isEnabled(), true);
    assert.equal(await page.getByLabel("Your question").inputValue(), "", "the box is cleared for the next question");
    await page.screenshot({ path: join(outDir, "page-ok.png"), fullPage: true });
  });
});

test("a Pro timeout is shown as such, with the Flash preview kept", async () => {
  await withPage({ ...fast, SIMULATED_PRO_TTFT_S: "5", PRO_TIMEOUT_S: "1" }, async (page) => {
    await ask(page, "Will Pro make it?");
    await page.locator("#status").filter({ hasText: "preview only" }).waitFor({ timeout: 15000 });
    const turn = turns(page).first();
    const error = turn.locator(".pro .error");
    assert.equal(await error.isVisible(), true);
    assert.match(await error.textContent(), /^Timed out: pro did not finish within its deadline \(1\.0 s\)/);
    assert.match(await turn.locator(".flash .text").textContent(), /^Quick take on/);
    await page.screenshot({ path: join(outDir, "page-pro-timeout.png"), fullPage: true });
  });
});

test("with API keys the page asks for one and streams with fetch", async () => {
  await withPage({ ...fast, API_KEYS: "page-test-key" }, async (page) => {
    const key = page.getByLabel("API key");
    assert.equal(await key.isVisible(), true);
    await key.fill("wrong");
    await ask(page, "Keyed question");
    await page.locator("#status").filter({ hasText: "The API key was refused." }).waitFor();
    assert.equal(await turns(page).count(), 0, "a refused question leaves no turn");
    assert.equal(await page.getByLabel("Your question").inputValue(), "Keyed question", "and goes back in the box");
    await key.fill("page-test-key");
    await page.getByRole("button", { name: "Ask both models" }).click();
    await page.locator("#status").filter({ hasText: "Done" }).waitFor({ timeout: 15000 });
    await ended(page, 0);
    assert.match(await turns(page).first().locator(".pro .text").textContent(), /^Considered answer on “Keyed question”/);
    assert.ok(!page.url().includes("page-test-key"), "the key is not in the URL");
  }, [/status of 401/]);
});

test("the page's assets: versioned links, content types, caching, CSP", async () => {
  await withPage(fast, async (page, url) => {
    const index = await fetch(url);
    const csp = index.headers.get("content-security-policy");
    assert.match(csp, /script-src 'self';/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
    assert.equal(index.headers.get("cache-control"), "no-cache");
    const html = await index.text();
    const links = [...html.matchAll(/(?:src|href)="(\/[^"]+\?v=[0-9a-f]{16})"/g)].map((m) => m[1]);
    assert.deepEqual(links.map((l) => l.split("?")[0]).sort(),
      ["/app.css", "/app.js", "/markdown.js", "/vendor/marked.umd.js", "/vendor/purify.min.js"]);
    for (const link of links) {
      const asset = await fetch(new URL(link, url));
      assert.equal(asset.status, 200, link);
      const type = link.includes(".css") ? "text/css; charset=utf-8" : "text/javascript; charset=utf-8";
      assert.equal(asset.headers.get("content-type"), type, link);
      assert.equal(asset.headers.get("cache-control"), "public, max-age=31536000, immutable", link);
      assert.equal(asset.headers.get("x-content-type-options"), "nosniff");
      const etag = asset.headers.get("etag");
      assert.equal(etag, `"${link.split("?v=")[1]}"`);
      const again = await fetch(new URL(link.split("?")[0], url), { headers: { "If-None-Match": etag } });
      assert.equal(again.status, 304, `${link} revalidated`);
      assert.equal(again.headers.get("cache-control"), "no-cache", "unversioned: revalidate every time");
    }
    // The page really runs on what it linked: both libraries are there.
    assert.equal(await page.evaluate(() => typeof marked.parse + typeof DOMPurify.sanitize), "functionfunction");
  });
});

test("a conversation: the next question carries the last final answer, and New conversation clears it", async () => {
  await withPage({ ...fast, ADMIN_TOKEN }, async (page, url) => {
    const bodies = postedBodies(page);
    await ask(page, "Why is the sky blue?");
    await ended(page, 0);
    await ask(page, "And at sunset?");
    await ended(page, 1);
    const [first, second] = await Promise.all([0, 1].map((i) => turns(page).nth(i).locator("[data-run-id]").textContent()));
    const record = await auditRecord(url, first);
    assert.equal(record.status, "ok");
    assert.deepEqual(bodies[0], { query: "Why is the sky blue?", deltas: true }, "a first question goes as `query`");
    assert.deepEqual(bodies[1], {
      messages: [
        { role: "user", content: "Why is the sky blue?" },
        { role: "assistant", content: record.pro.text },
        { role: "user", content: "And at sunset?" },
      ],
      deltas: true,
    });
    // The service ran the conversation: its answer is to the last question.
    assert.equal(await turns(page).nth(1).getAttribute("data-outcome"), "done");
    assert.match(await turns(page).nth(1).locator(".pro .text").textContent(), /^Considered answer on “And at sunset\?”/);
    const secondRecord = await auditRecord(url, second);
    assert.equal(secondRecord.query, "And at sunset?");
    assert.deepEqual(secondRecord.messages, bodies[1].messages, "the run was given the whole conversation");
    await page.screenshot({ path: join(outDir, "page-conversation.png"), fullPage: true });

    await page.getByRole("button", { name: "New conversation" }).click();
    assert.equal(await turns(page).count(), 0);
    await ask(page, "A fresh start");
    await ended(page, 0);
    assert.deepEqual(bodies[2], { query: "A fresh start", deltas: true }, "nothing of the old conversation is sent");
  });
});

test("when Pro fails, the next question carries Flash's answer", async () => {
  await withPage({ ...fast, SIMULATED_PRO_TTFT_S: "5", PRO_TIMEOUT_S: "1", ADMIN_TOKEN }, async (page, url) => {
    const bodies = postedBodies(page);
    await ask(page, "Will Pro make it?");
    await ended(page, 0);
    const record = await auditRecord(url, await turns(page).first().locator("[data-run-id]").textContent());
    assert.equal(record.status, "partial");
    await ask(page, "Then what?");
    await ended(page, 1);
    assert.deepEqual(bodies[1].messages, [
      { role: "user", content: "Will Pro make it?" },
      { role: "assistant", content: record.flash.text },
      { role: "user", content: "Then what?" },
    ]);
    assert.equal(await turns(page).nth(1).getAttribute("data-outcome"), "done");
  });
});

test("a conversation grown past MAX_QUERY_BYTES is refused with a way out", async () => {
  // 200 bytes: a short question fits, the same question after a Pro answer does not.
  await withPage({ ...fast, MAX_QUERY_BYTES: "200" }, async (page) => {
    const bodies = postedBodies(page);
    await ask(page, "Hi");
    await ended(page, 0);
    await ask(page, "More");
    await page.locator("#status").filter({ hasText: "The conversation is too long: start a new one." }).waitFor({ timeout: 15000 });
    assert.equal(bodies[1].messages.length, 3);
    assert.equal(await turns(page).count(), 1, "the refused question left no turn");
    assert.equal(await page.getByLabel("Your question").inputValue(), "More");
    await page.getByRole("button", { name: "New conversation" }).click();
    await page.getByRole("button", { name: "Ask both models" }).click();
    await ended(page, 0);
    assert.deepEqual(bodies[2], { query: "More", deltas: true });
    assert.equal(await turns(page).first().getAttribute("data-outcome"), "done");
  }, [/status of 413/]);
});

test("answers are rendered as Markdown: lists, code blocks, tables, links", async () => {
  await withPage(fast, async (page) => {
    const flash = "Two steps:\n\n1. measure\n2. decide\n";
    const pro = [
      "Three steps:", "",
      "- first item", "- second **bold** item", "- third item", "",
      "```rust", "fn main() {", "    println!(\"<b>not bold</b>\");", "}", "```", "",
      "| a | b |", "|---|---|", "| 1 | 2 |", "",
      "See [the docs](https://example.com/docs) and `inline code`.", "",
      "![a chart](https://example.com/chart.png)",
    ].join("\n");
    await scriptAnswer(page, scriptedStream(flash, pro));
    await ask(page, "Markdown please");
    await ended(page, 0);
    const turn = turns(page).first();
    assert.deepEqual(await turn.locator(".flash .text ol > li").allTextContents(), ["measure", "decide"]);
    const text = turn.locator(".pro .text");
    assert.deepEqual(await text.locator("ul > li").allTextContents(), ["first item", "second bold item", "third item"]);
    assert.equal(await text.locator("li strong").textContent(), "bold");
    const code = text.locator("pre > code");
    assert.equal(await code.textContent(), "fn main() {\n    println!(\"<b>not bold</b>\");\n}\n");
    assert.equal(await code.locator("b").count(), 0, "HTML in a code block is shown, not applied");
    assert.deepEqual(await text.locator("td").allTextContents(), ["1", "2"]);
    assert.equal(await text.locator(":not(pre) > code").textContent(), "inline code");
    const link = text.getByRole("link", { name: "the docs" });
    assert.equal(await link.getAttribute("href"), "https://example.com/docs");
    assert.equal(await link.getAttribute("target"), "_blank");
    assert.equal(await link.getAttribute("rel"), "noopener noreferrer");
    const image = text.getByRole("link", { name: "a chart" });
    assert.equal(await image.getAttribute("href"), "https://example.com/chart.png", "an image is shown as a link to it");
    assert.equal(await text.locator("img").count(), 0);
    assert.match(await page.locator("#status").textContent(), /^Done \(flash ok, pro ok, 9 ms\)/);
    await page.screenshot({ path: join(outDir, "page-markdown.png"), fullPage: true });
  });
});

// Checks the whole document after hostile answers: nothing of them can run or call out.
async function assertInert(page) {
  const found = await page.evaluate(() => {
    const bad = [];
    for (const el of document.querySelectorAll("*")) {
      for (const attr of el.attributes) {
        if (/^on/i.test(attr.name)) bad.push(`${el.tagName} ${attr.name}`);
        if (/^\s*(javascript|data|vbscript):/i.test(attr.value) && el.tagName !== "LINK") bad.push(`${el.tagName} ${attr.name}=${attr.value}`);
        if (attr.name === "style" || attr.name === "srcdoc") bad.push(`${el.tagName} ${attr.name}`);
      }
    }
    for (const sel of ["script", "iframe", "img", "svg", "math", "form", "style", "object", "embed"]) {
      const n = document.querySelectorAll(`.turn ${sel}`).length;
      if (n) bad.push(`${n} ${sel} in an answer`);
    }
    // marked, DOMPurify, markdown.js and app.js.
    if (document.scripts.length !== 4) bad.push(`${document.scripts.length} scripts on the page`);
    for (const a of document.querySelectorAll(".turn a[href]")) {
      if (!/^https?:/.test(a.href)) bad.push(`a link to ${a.href}`);
      if (a.rel !== "noopener noreferrer" || a.target !== "_blank") bad.push(`a link without rel/target`);
    }
    return bad;
  });
  assert.deepEqual(found, []);
}

const HOSTILE = [
  "<img src=x onerror=alert(1)>",
  "[click](javascript:alert(1))",
  "[CLICK](JaVaScRiPt:alert(1))",
  "<script>alert(1)</script>",
  "<iframe src=\"javascript:alert(1)\"></iframe>",
  "<iframe srcdoc=\"<script>alert(1)</script>\"></iframe>",
  "<a href=\"data:text/html,<script>alert(1)</script>\">data link</a>",
  "<a href=\"jav&#x09;ascript:alert(1)\">tab link</a>",
  "<svg onload=alert(1)><circle r=1></circle></svg>",
  "<details open ontoggle=alert(1)><summary>s</summary>x</details>",
  "<math><mi xlink:href=\"javascript:alert(1)\">m</mi></math>",
  "<form action=\"javascript:alert(1)\"><button>go</button></form>",
  "<p style=\"background:url(javascript:alert(1))\">styled</p>",
  "![img](javascript:alert(1))",
  "and a [fine link](https://example.com/ok).",
];

test("script in an answer does nothing (scripted answer with hostile HTML and links)", async () => {
  await withPage(fast, async (page) => {
    const hostile = HOSTILE.join("\n\n");
    await scriptAnswer(page, scriptedStream(hostile, hostile, "\n"));
    await ask(page, "Be hostile");
    await ended(page, 0);
    const text = turns(page).first().locator(".pro .text");
    // Markup from the model is shown as the text it is.
    for (const line of ["<img src=x onerror=alert(1)>", "<script>alert(1)</script>",
      "<a href=\"data:text/html,<script>alert(1)</script>\">data link</a>", "<details open ontoggle=alert(1)>"]) {
      assert.equal(await text.getByText(line).count() > 0, true, `${line} shown as text`);
    }
    // Markdown links are links, and one to javascript: loses its target.
    assert.equal(await text.getByRole("link", { name: "fine link" }).getAttribute("href"), "https://example.com/ok");
    assert.equal(await text.locator("a", { hasText: /^img$/ }).getAttribute("href"), null, "an image is a link, here dropped");
    assert.equal(await text.locator("a", { hasText: /^click$/i }).count(), 2);
    for (const a of await text.locator("a", { hasText: /^click$/i }).all()) {
      assert.equal(await a.getAttribute("href"), null, "javascript: href dropped");
    }
    await assertInert(page);
    await page.screenshot({ path: join(outDir, "page-hostile.png"), fullPage: true });
  });
});

test("script in an answer does nothing (the service's own answer repeats hostile text)", async () => {
  await withPage(fast, async (page) => {
    // The simulated models quote the question in their answers: this reaches the page
    // through the whole service, deltas and all.
    const question = "<img src=x onerror=alert(1)> [x](javascript:alert(1))";
    await ask(page, question);
    await ended(page, 0);
    const turn = turns(page).first();
    assert.equal(await turn.locator("[data-question]").textContent(), question, "the question is shown as typed");
    assert.match(await turn.locator(".pro .text").textContent(), /^Considered answer on “<img src=x onerror=alert\(1\)> x”:/);
    assert.equal(await turn.locator(".pro .text a").getAttribute("href"), null);
    await assertInert(page);
  });
});

test("the sanitizer alone makes raw hostile HTML inert (the second line of defence)", async () => {
  // Chrome reports the inline handlers and styles it blocks when DOMPurify parses the HTML in
  // its inert document: those reports are expected here, and prove the CSP a third line.
  await withPage(fast, async (page) => {
    await page.evaluate((html) => {
      const turn = document.createElement("div");
      turn.className = "turn";
      turn.append(DOMPurify.sanitize(html, SANITIZE));
      document.getElementById("conversation").append(turn);
    }, HOSTILE.join("\n"));
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    const turn = turns(page).first();
    assert.equal(await turn.getByText("styled").count(), 1, "harmless content is kept");
    assert.equal(await turn.getByText("data link").count(), 1);
    await assertInert(page);
  }, [/^Executing inline event handler violates/, /^Applying inline style violates/]);
});

test("the event-stream reader: every line end, comments, multi-line data, any chunking", async () => {
  await withPage(fast, async (page) => {
    const failures = await page.evaluate(async () => {
      const text = ": hello\r\n"
        + "event: start\r\nid: r:0\r\ndata: {\"a\":1}\r\n\r\n"
        + "event: delta\nid: r:1\ndata: line one\ndata: line two é😀\n\n"
        + ": keep-alive\r\r"
        + "event: x\rdata\rdata:  two spaces\r\r"
        + "data: no type\r\n\n"
        + "event: nodata\nid: r:9\n\n"
        + "id: r:2\ndata:{\"b\":2}\r\n\r\n"
        + "data: never ended";
      const expected = JSON.stringify([
        ["start", "{\"a\":1}", "r:0"],
        ["delta", "line one\nline two é😀", "r:1"],
        ["x", "\n two spaces", "r:1"],
        ["message", "no type", "r:1"],
        ["message", "{\"b\":2}", "r:2"],
      ]);
      const bytes = new TextEncoder().encode(text);
      const read = async (cuts) => {
        const got = [];
        const body = new ReadableStream({
          start(c) {
            let from = 0;
            for (const to of [...cuts, bytes.length]) { c.enqueue(bytes.slice(from, to)); from = to; }
            c.close();
          },
        });
        await readEvents(new Response(body), (type, data, id) => got.push([type, data, id]));
        return JSON.stringify(got);
      };
      const failed = [];
      // Cut once at every byte (inside CRLFs and UTF-8 sequences too), then byte by byte.
      for (let at = 0; at <= bytes.length; at++) {
        if (await read([at]) !== expected) failed.push(`cut at ${at}`);
      }
      const everyByte = Array.from({ length: bytes.length }, (_, i) => i + 1);
      if (await read(everyByte) !== expected) failed.push("byte by byte");
      return failed;
    });
    assert.deepEqual(failures, []);
  });
});

test("a dropped stream is resumed with Last-Event-ID and ends as the run did", async () => {
  await withPage({ ...fast, ADMIN_TOKEN }, async (page, url) => {
    let keptId = null;
    const resumes = [];
    await page.route("**/query/stream", async (route) => {
      const request = route.request();
      if (request.method() !== "POST") {
        resumes.push(await request.headerValue("last-event-id"));
        return route.continue();
      }
      // The real run, cut after its fourth event as if the connection had dropped there.
      const real = await route.fetch();
      const frames = (await real.text()).split("\n\n").filter((f) => /^id: /m.test(f));
      const kept = frames.slice(0, 4);
      keptId = kept[3].match(/^id: (.*)$/m)[1];
      await route.fulfill({
        status: 200,
        headers: { "content-type": "text/event-stream", "x-run-id": real.headers()["x-run-id"] },
        body: kept.join("\n\n") + "\n\n",
      });
    });
    await ask(page, "Resume me");
    await ended(page, 0);
    const turn = turns(page).first();
    assert.equal(await turn.getAttribute("data-outcome"), "done");
    assert.match(keptId, /^[0-9a-f-]{36}:3$/);
    assert.deepEqual(resumes, [keptId], "one resume, from the last event read");
    const record = await auditRecord(url, await turn.locator("[data-run-id]").textContent());
    assert.equal((await turn.locator(".pro .text").textContent()).trim(), record.pro.text);
    assert.equal((await turn.locator(".flash .text").textContent()).trim(), record.flash.text);
    assert.match(await page.locator("#status").textContent(), /^Done \(flash ok, pro ok/);
  });
});

test("a blank final answer is not sent back: the next question carries Flash's, or leaves the turn out", async () => {
  // A model may end well with nothing but white space (a length cut after thinking, a local
  // model's lone newline). The service refuses a blank `assistant` message, so sending it
  // back would make every later question of the conversation a 400.
  await withPage({ ...fast, ADMIN_TOKEN }, async (page) => {
    const bodies = postedBodies(page);
    await scriptAnswer(page, scriptedStream("The preview.", " \n\u0085"));
    await ask(page, "First");
    await ended(page, 0);
    await page.unroute("**/query/stream");
    await ask(page, "Second");
    await ended(page, 1);
    assert.deepEqual(bodies[1].messages, [
      { role: "user", content: "First" },
      { role: "assistant", content: "The preview." },
      { role: "user", content: "Second" },
    ]);
    assert.equal(await turns(page).nth(1).getAttribute("data-outcome"), "done");
    assert.match(await turns(page).nth(1).locator(".pro .text").textContent(), /^Considered answer on “Second”/);

    await page.getByRole("button", { name: "New conversation" }).click();
    await scriptAnswer(page, scriptedStream("\t", "\n\n"));
    await ask(page, "Both blank");
    await ended(page, 0);
    await page.unroute("**/query/stream");
    assert.match(await turns(page).first().locator("[data-kept]").textContent(), /left out of the conversation/);
    await ask(page, "Again");
    await ended(page, 1);
    assert.deepEqual(bodies[3], { query: "Again", deltas: true });
    assert.equal(await turns(page).nth(1).getAttribute("data-outcome"), "done");
  });
});
