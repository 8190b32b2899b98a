/**
 * Starts a real Chorus instance with its gateway for the gateway tests:
 * `python -m runtime launch --no-engine --serve --port <free>` in a temporary data
 * directory, waits for `/healthz`, hands the tests its URL and token, and stops it
 * with SIGINT at the end (SIGKILL after 30 s). It builds the web page first, since the
 * gateway serves `dist/web` at `/`.
 *
 * With no engine, a chat turn is answered by the narrator's `engine_down` playbook
 * notice: a real narrator stream through the real bus, without a model.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { build } from "vite";
import type { TestProject } from "vitest/node";

/** What the gateway tests get from `inject("gateway")`. */
export interface GatewayUnderTest {
  baseUrl: string;
  token: string;
  dataDir: string;
}

declare module "vitest" {
  export interface ProvidedContext {
    gateway: GatewayUnderTest;
  }
}

const PACKAGE = resolve(import.meta.dirname, "../..");
const REPO = resolve(PACKAGE, "../..");
const PYTHON = process.env.CHORUS_PYTHON ?? join(REPO, ".venv/bin/python");

function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => done(typeof address === "object" && address ? address.port : 0));
    });
  });
}

function exited(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((done) => {
    const timer = setTimeout(() => done(false), ms);
    child.once("exit", () => {
      clearTimeout(timer);
      done(true);
    });
  });
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  // the gateway serves dist/web at `/`: build it from the sources under test
  await build({ configFile: join(PACKAGE, "vite.config.ts"), logLevel: "warn" });
  const root = mkdtempSync(join(tmpdir(), "chorus-ts-"));
  const dataDir = join(root, "data");
  // a tiny corpus keeps the search and rag agents' first indexing quick
  const corpus = join(root, "corpus");
  mkdirSync(corpus);
  writeFileSync(join(corpus, "lists.md"), "# Lists\n\nA list is a mutable sequence.\n");
  const port = await freePort();
  const logPath = join(root, "launch.log");
  const log = openSync(logPath, "a");
  const child = spawn(
    PYTHON,
    ["-m", "runtime", "launch", "--no-engine", "--serve", "--port", String(port), "--data-dir", dataDir, "--corpus", corpus],
    { cwd: REPO, stdio: ["ignore", log, log], env: { ...process.env, PYTHONUNBUFFERED: "1" } },
  );
  const baseUrl = `http://127.0.0.1:${port}`;
  const stop = async (): Promise<void> => {
    if (!(await exited(child, 0))) {
      child.kill("SIGINT");
      if (!(await exited(child, 30_000))) {
        child.kill("SIGKILL");
        await exited(child, 5_000);
      }
    }
    if (!process.env.CHORUS_KEEP_TEST_DATA) rmSync(root, { recursive: true, force: true });
  };
  const tail = (): string => readFileSync(logPath, "utf8").slice(-3000);

  const deadline = Date.now() + 90_000;
  let token = "";
  for (;;) {
    if (child.exitCode !== null) {
      const out = tail();
      await stop();
      throw new Error(`the gateway under test exited (${child.exitCode}):\n${out}`);
    }
    if (Date.now() > deadline) {
      const out = tail();
      await stop();
      throw new Error(`the gateway under test did not come up in 90 s:\n${out}`);
    }
    try {
      token ||= readFileSync(join(dataDir, "keys", "gateway.token"), "utf8").trim();
      const health = await fetch(`${baseUrl}/healthz`);
      // the agents come up after the gateway: wait until /v1/agents lists them
      if (token && health.ok) {
        const agents = await fetch(`${baseUrl}/v1/agents`, { headers: { Authorization: `Bearer ${token}` } });
        const body = agents.ok ? ((await agents.json()) as { agents: { name: string; state: string }[] }) : { agents: [] };
        const up = new Set(body.agents.filter((a) => a.state === "idle" || a.state === "busy").map((a) => a.name));
        if (["controller", "narrator", "coder", "search", "rag"].every((n) => up.has(n))) break;
      }
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  project.provide("gateway", { baseUrl, token, dataDir });
  return stop;
}
