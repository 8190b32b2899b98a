/**
 * The web chat page in Debian's Chromium, driven by playwright-core against the real
 * gateway: log in, ask, watch the notice stream in, toggle the rail, interrupt, and
 * look right at phone width. Screenshots go to test-results/web/, or to
 * CHORUS_SCREENSHOT_DIR (`npm run screenshots`: benchmarks/results/web/).
 */
import { existsSync, mkdirSync } from "node:fs";
import { resolve } from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";

const { baseUrl, token } = inject("gateway");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
// an ignored artefact folder, so `make test` leaves the tree clean; `npm run screenshots`
// writes the committed ones under benchmarks/results/web/
const SHOTS = resolve(process.env.CHORUS_SCREENSHOT_DIR ?? resolve(import.meta.dirname, "../../test-results/web"));
const ENGINE_DOWN = "The language model is restarting";
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let browser: Browser;
let desktop: BrowserContext;
let page: Page;

async function ask(p: Page, text: string): Promise<void> {
  await p.fill("#input", text);
  await p.press("#input", "Enter");
}

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium (or set CHROMIUM_PATH)`);
  }
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
  desktop = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  page = await desktop.newPage();
});

afterAll(async () => {
  await browser?.close();
});

describe("the web chat page", () => {
  it("asks for the token without the login cookie, refuses a wrong one, and logs in with the right one", async () => {
    await page.goto(`${baseUrl}/`);
    await page.locator("#login").waitFor({ state: "visible" });
    await page.fill("#token", "not-the-token");
    await page.click("#login-form button[type=submit]");
    await expect.poll(() => page.locator("#login-error").textContent()).toContain("not the gateway's token");
    await page.fill("#token", token);
    await Promise.all([page.waitForURL(`${baseUrl}/`), page.click("#login-form button[type=submit]")]);
    await page.locator("#agents li").first().waitFor();
    expect(await page.locator("#login").isHidden()).toBe(true);
    const cookies = await desktop.cookies(baseUrl);
    expect(cookies.find((c) => c.name === "chorus_token")).toMatchObject({ httpOnly: true, sameSite: "Strict" });
  });

  it("streams the narrator's answer into the conversation, a playbook notice as a distinct notice", async () => {
    await ask(page, "Hi! Who are you?");
    const turn = page.locator(".turn").nth(0);
    await expect.poll(() => turn.locator(".message.user").textContent()).toBe("Hi! Who are you?");
    await turn.locator(".notice").filter({ hasText: ENGINE_DOWN }).waitFor();
    await page.locator(".turn.streaming").waitFor({ state: "detached" });
    expect(await turn.locator(".notice").getAttribute("role")).toBe("status");
    expect(await page.inputValue("#input")).toBe("");
  });

  it("shows the agents and decisions in the rail, which the button hides and shows", async () => {
    const rail = page.locator("#rail");
    expect(await rail.isVisible()).toBe(true);
    for (const name of ["coder", "search", "rag"]) {
      await page.locator(`#agents li[data-agent="${name}"]`).waitFor();
    }
    await page.locator("#decisions li.decision").first().waitFor();
    await page.click("#rail-toggle");
    expect(await rail.isHidden()).toBe(true);
    expect(await page.getAttribute("#rail-toggle", "aria-expanded")).toBe("false");
    await page.click("#rail-toggle");
    expect(await rail.isVisible()).toBe(true);
    expect(await page.getAttribute("#rail-toggle", "aria-expanded")).toBe("true");
  });

  it("sending while a reply streams interrupts it and answers the new message", async () => {
    await ask(page, "Search the docs for the assert statement.");
    const first = page.locator(".turn").nth(1);
    await first.locator(".message.narrator").first().waitFor(); // the acknowledgement: still streaming
    expect(await first.getAttribute("class")).toContain("streaming");
    // the search task, running with its elapsed time or already ended with its duration
    await expect.poll(() => page.locator("#tasks li.task .elapsed").first().textContent()).toMatch(/\d+s/);
    await ask(page, "Thanks, hello again!");
    await first.locator(".notice.interrupted").waitFor();
    expect(await first.getAttribute("class")).toContain("interrupted");
    const second = page.locator(".turn").nth(2);
    await second.locator(".notice").filter({ hasText: ENGINE_DOWN }).waitFor();
    await page.locator(".turn.streaming").waitFor({ state: "detached" });
    await page.screenshot({ path: resolve(SHOTS, "desktop.png") });
  });

  it("a reply whose connection breaks off is fetched again from the last chunk shown", async () => {
    // the gateway's real response, cut after its first chunk as a dropped connection would
    const deltas: string[] = [];
    await page.route("**/v1/chat", async (route) => {
      const response = await route.fetch();
      const events = (await response.text()).split("\n\n").filter((e) => e.startsWith("event: "));
      for (const event of events.filter((e) => e.startsWith("event: chunk"))) {
        deltas.push((JSON.parse(event.split("\ndata: ")[1] ?? "{}") as { delta: string }).delta);
      }
      await route.fulfill({ response, body: `: stream open\n\n${events[0]}\n\n` });
    });
    try {
      const tail = page.waitForRequest((request) => request.url().includes("/tail?"));
      await ask(page, "Are you still there?");
      const asked = new URL((await tail).url());
      expect(asked.searchParams.get("after")).toBe("0");
      const turn = page.locator(".turn").last();
      await page.locator(".turn.streaming").waitFor({ state: "detached" });
      expect(deltas.length).toBeGreaterThan(1); // the cut left something to fetch
      expect(await turn.locator(".notice.error").count()).toBe(0);
      // every stream of the turn shows all its text, once (Markdown may change the spacing),
      // and the rest came from the tail: the cut response held only the first chunk
      const shown = (await turn.locator(".message.narrator, .notice").allTextContents()).join("");
      expect(shown.replace(/\s+/g, "")).toBe(deltas.join("").replace(/\s+/g, ""));
      for (const cls of await turn.locator(".message.narrator, .notice").evaluateAll((els) => els.map((e) => e.className))) {
        expect(cls).toMatch(/\b(done|failed)\b/); // its final came through too
      }
    } finally {
      await page.unroute("**/v1/chat");
    }
  });

  it("fits a 390 px phone screen, with the rail as a drawer, after logging in by URL", async () => {
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    try {
      const p = await phone.newPage();
      await p.goto(`${baseUrl}/login?token=${encodeURIComponent(token)}`);
      expect(p.url()).toBe(`${baseUrl}/`);
      expect(await p.locator("#rail").isHidden()).toBe(true); // closed by default on a phone
      await ask(p, "Hello from a phone");
      await p.locator(".turn .notice").filter({ hasText: ENGINE_DOWN }).waitFor();
      await p.locator(".turn.streaming").waitFor({ state: "detached" });
      const width = await p.evaluate(() => document.documentElement.scrollWidth);
      expect(width).toBeLessThanOrEqual(390);
      for (const selector of ["#input", "#send", "#rail-toggle"]) {
        const box = await p.locator(selector).boundingBox();
        expect(box, selector).not.toBeNull();
        expect(box!.x + box!.width, selector).toBeLessThanOrEqual(390);
      }
      await p.screenshot({ path: resolve(SHOTS, "phone.png") });
      await p.click("#rail-toggle");
      await p.locator("#agents li").first().waitFor();
      expect(await p.locator("#rail").isVisible()).toBe(true);
      await p.screenshot({ path: resolve(SHOTS, "phone-rail.png") });
      await p.click("#rail-toggle");
      // the user's own text is shown as text, never as markup
      const hostile = 'A <img src=x onerror="window.hacked=1"> and **stars**';
      await ask(p, hostile);
      const turn = p.locator(".turn").nth(1);
      await turn.locator(".notice").filter({ hasText: ENGINE_DOWN }).waitFor();
      expect(await turn.locator(".message.user").textContent()).toBe(hostile);
      expect(await p.locator(".turn img").count()).toBe(0);
      expect(await p.evaluate(() => (window as unknown as { hacked?: number }).hacked)).toBeUndefined();
    } finally {
      await phone.close();
    }
  });
});
