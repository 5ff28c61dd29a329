// The page as a person sees it, in real headless Chromium (Debian's package, driven by
// playwright-core), against a real duet with the simulated providers.
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
    await page.goto(url);
    await fn(page);
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

test("a question streams into both panels and the run ends", async () => {
  await withPage(fast, async (page) => {
    await page.getByLabel("Your question").fill("Why is the sky blue?");
    await page.getByRole("button", { name: "Ask both models" }).click();
    await page.locator("#flash .text").filter({ hasText: "Quick take on" }).waitFor();
    await page.locator("#status").filter({ hasText: "Done" }).waitFor({ timeout: 15000 });
    const flash = await page.locator("#flash .text").textContent();
    const pro = await page.locator("#pro .text").textContent();
    assert.match(flash, /^Quick take on “Why is the sky blue\?”:/);
    assert.match(pro, /^Considered answer on “Why is the sky blue\?”:/);
    assert.match(await page.locator("#pro .meta").textContent(), /simulated · simulated-pro · \d+ ms/);
    assert.match(await page.locator("#run-id").textContent(), /^[0-9a-f-]{36}$/);
    assert.match(await page.locator("#status").textContent(), /Done \(flash ok, pro ok, \d+ ms\)/);
    assert.equal(await page.getByRole("button", { name: "Ask both models" }).isEnabled(), true);
    await page.screenshot({ path: join(outDir, "page-ok.png"), fullPage: true });
  });
});

test("a Pro timeout is shown as such, with the Flash preview kept", async () => {
  await withPage({ ...fast, SIMULATED_PRO_TTFT_S: "5", PRO_TIMEOUT_S: "1" }, async (page) => {
    await page.getByLabel("Your question").fill("Will Pro make it?");
    await page.getByRole("button", { name: "Ask both models" }).click();
    await page.locator("#status").filter({ hasText: "preview only" }).waitFor({ timeout: 15000 });
    const error = page.locator("#pro .error");
    assert.equal(await error.isVisible(), true);
    assert.match(await error.textContent(), /^Timed out: pro did not finish within its deadline \(1\.0 s\)/);
    assert.match(await page.locator("#flash .text").textContent(), /^Quick take on/);
    await page.screenshot({ path: join(outDir, "page-pro-timeout.png"), fullPage: true });
  });
});

test("with API keys the page asks for one and streams with fetch", async () => {
  await withPage({ ...fast, API_KEYS: "page-test-key" }, async (page) => {
    const key = page.getByLabel("API key");
    assert.equal(await key.isVisible(), true);
    await page.getByLabel("Your question").fill("Keyed question");
    await key.fill("wrong");
    await page.getByRole("button", { name: "Ask both models" }).click();
    await page.locator("#status").filter({ hasText: "The API key was refused." }).waitFor();
    await key.fill("page-test-key");
    await page.getByRole("button", { name: "Ask both models" }).click();
    await page.locator("#status").filter({ hasText: "Done" }).waitFor({ timeout: 15000 });
    assert.match(await page.locator("#pro .text").textContent(), /^Considered answer on “Keyed question”/);
    assert.ok(!page.url().includes("page-test-key"), "the key is not in the URL");
  }, [/status of 401/]);
});
