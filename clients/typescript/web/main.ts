/**
 * The gateway's web chat: the narrator's stream as the conversation, an input that
 * interrupts, and an activity rail (agents, running tasks, decisions) fed by
 * /v1/agents, /v1/tasks, /v1/decisions and the /v1/events stream.
 *
 * Every call goes to the page's own origin with the `chorus_token` cookie that
 * /login set; a 401 shows the token box, which logs in through /login.
 * Text from the gateway only reaches the page through `textContent` or the escaping
 * Markdown renderer.
 */
import { ChorusAuthError, ChorusClient, ChorusHttpError, ChorusStreamError, isAbortError } from "../src/index.js";
import type { Agent, BusEvent, ChatEvent, TaskNode } from "../src/index.js";
import { renderMarkdown } from "./markdown.js";

const client = new ChorusClient();

function byId<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (el === null) throw new Error(`the page has no #${id}`);
  return el as T;
}

function make<K extends keyof HTMLElementTagNameMap>(tag: K, className = "", text = ""): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text) el.textContent = text;
  return el;
}

const view = {
  conversation: byId<HTMLElement>("conversation"),
  empty: byId<HTMLElement>("empty"),
  input: byId<HTMLTextAreaElement>("input"),
  composer: byId<HTMLFormElement>("composer"),
  rail: byId<HTMLElement>("rail"),
  railToggle: byId<HTMLButtonElement>("rail-toggle"),
  agents: byId<HTMLUListElement>("agents"),
  tasks: byId<HTMLUListElement>("tasks"),
  decisions: byId<HTMLOListElement>("decisions"),
  health: byId<HTMLElement>("health"),
  login: byId<HTMLElement>("login"),
  loginForm: byId<HTMLFormElement>("login-form"),
  token: byId<HTMLInputElement>("token"),
  loginError: byId<HTMLElement>("login-error"),
};

// -- login ------------------------------------------------------------------------------

let loginShown = false;

function showLogin(): void {
  if (loginShown) return;
  loginShown = true;
  view.login.hidden = false;
  view.token.focus();
}

view.loginForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = view.token.value.trim();
  if (!token) return;
  // try the token first, so a wrong one is said here rather than on a JSON error page
  new ChorusClient({ token }).listAgents().then(
    // /login sets the cookie and sends the browser back to `/`
    () => window.location.assign(`/login?token=${encodeURIComponent(token)}`),
    (error: unknown) => {
      view.loginError.textContent =
        error instanceof ChorusAuthError ? "That token is not the gateway's token." : String(error);
      view.loginError.hidden = false;
    },
  );
});

/** Shows the login box on a 401; true when the error was handled that way. */
function handledAuth(error: unknown): boolean {
  if (error instanceof ChorusAuthError) {
    showLogin();
    return true;
  }
  return false;
}

// -- the conversation -------------------------------------------------------------------

let conversation: string | undefined;
let pendingConversation: Promise<string | undefined> | undefined;
let current: { abort: AbortController; turn: HTMLElement } | undefined;

function nearBottom(): boolean {
  const c = view.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function keepInView(stick: boolean): void {
  if (stick) view.conversation.scrollTop = view.conversation.scrollHeight;
}

/** One narrator stream inside a turn: a message, or a notice when its chunks are notices. */
class StreamView {
  readonly el: HTMLElement;
  private readonly body: HTMLElement;
  private text = "";

  constructor(turn: HTMLElement, notice: boolean) {
    this.el = make("div", notice ? "notice" : "message narrator");
    if (notice) this.el.setAttribute("role", "status");
    this.body = make("div", "text");
    this.el.append(this.body);
    turn.append(this.el);
  }

  append(delta: string): void {
    this.text += delta;
    this.body.innerHTML = renderMarkdown(this.text); // escapes everything it is given
  }

  finish(finish: string, sources: string[]): void {
    this.el.classList.add(finish === "error" ? "failed" : "done");
    // the narrator usually attaches its sources to the text by code: list only the others
    const unsaid = sources.filter((source) => !this.text.includes(source));
    if (unsaid.length > 0) {
      const list = make("ul", "sources");
      for (const source of unsaid) list.append(make("li", "", source));
      this.el.append(list);
    }
  }
}

function noteInTurn(turn: HTMLElement, text: string, kind: "error" | "interrupted"): void {
  const el = make("div", `notice ${kind}`, text);
  el.setAttribute("role", "status");
  turn.append(el);
}

function interrupt(turn: HTMLElement): void {
  if (turn.classList.contains("interrupted")) return;
  turn.classList.remove("streaming");
  turn.classList.add("interrupted");
  noteInTurn(turn, "interrupted", "interrupted");
}

async function send(text: string): Promise<void> {
  view.empty.remove();
  if (current) {
    // the gateway preempts the running turn when the new one arrives on the same conversation
    current.abort.abort();
    interrupt(current.turn);
  }
  const turn = make("section", "turn streaming");
  turn.append(make("div", "message user", text));
  view.conversation.append(turn);
  keepInView(true);
  const mine = { abort: new AbortController(), turn };
  current = mine;
  const known = conversation ?? (pendingConversation ? await pendingConversation : undefined);
  if (mine.abort.signal.aborted) return; // a newer turn came while we waited for the id
  const stream = client.streamChat(text, { conversation: known, signal: mine.abort.signal });
  const id = stream.conversation.then(
    (value) => value || undefined,
    () => undefined,
  );
  pendingConversation = id;
  void id.then((value) => {
    if (value) conversation = value;
  });
  try {
    await follow(turn, stream, id, mine.abort.signal);
  } catch (error) {
    if (isAbortError(error) || mine.abort.signal.aborted) return;
    if (handledAuth(error)) {
      noteInTurn(turn, "not logged in: log in, then send again", "error");
    } else if (error instanceof ChorusHttpError && error.status === 404 && known !== undefined) {
      conversation = undefined; // the gateway no longer knows it (restarted): the next turn starts a new one
      noteInTurn(turn, `${error.message} — send again to start a new conversation`, "error");
    } else {
      noteInTurn(turn, error instanceof Error ? error.message : String(error), "error");
    }
  } finally {
    turn.classList.remove("streaming");
    if (current === mine) current = undefined;
  }
}

const RESUME_TRIES = 3;
const RESUME_AFTER_MS = 1000; // then 2 s, 3 s

/**
 * Shows a turn's events as they come. When the connection breaks off mid-answer, asks
 * the gateway for the rest (`GET /v1/chat/{id}/tail`) from the last chunk shown, a
 * few times; what was shown already is not shown again.
 */
async function follow(
  turn: HTMLElement,
  first: AsyncIterable<ChatEvent>,
  conversationId: Promise<string | undefined>,
  signal: AbortSignal,
): Promise<void> {
  const streams = new Map<string, StreamView>();
  const shown = new Map<string, number>(); // per stream: the last seq shown
  const ended = new Set<string>(); // streams whose final was shown
  let last: { stream: string; seq: number } | undefined;
  let events = first;
  for (let attempt = 1; ; attempt++) {
    try {
      for await (const event of events) {
        if (event.type === "chunk") {
          if (event.seq <= (shown.get(event.stream) ?? -1)) continue;
          shown.set(event.stream, event.seq);
          last = { stream: event.stream, seq: event.seq };
        } else if (event.type === "final") {
          if (ended.has(event.stream)) continue;
          ended.add(event.stream);
        }
        const stick = nearBottom();
        render(turn, streams, event);
        keepInView(stick);
      }
      return;
    } catch (error) {
      const id = await conversationId;
      const broke = error instanceof ChorusStreamError && error.brokeOff;
      if (!broke || last === undefined || id === undefined || attempt > RESUME_TRIES) throw error;
      await new Promise((resume) => setTimeout(resume, RESUME_AFTER_MS * attempt));
      signal.throwIfAborted();
      events = client.resumeChat(id, { stream: last.stream, after: last.seq, signal });
    }
  }
}

function render(turn: HTMLElement, streams: Map<string, StreamView>, event: ChatEvent): void {
  switch (event.type) {
    case "chunk": {
      let stream = streams.get(event.stream);
      if (stream === undefined) {
        stream = new StreamView(turn, event.notice);
        streams.set(event.stream, stream);
      }
      stream.append(event.delta);
      break;
    }
    case "final":
      streams.get(event.stream)?.finish(event.finish, event.sources);
      break;
    case "interrupted":
      interrupt(turn);
      break;
  }
}

view.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = view.input.value.trim();
  if (!text) return;
  view.input.value = "";
  resizeInput();
  void send(text);
});

view.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    view.composer.requestSubmit();
  }
});

function resizeInput(): void {
  view.input.style.height = "auto";
  view.input.style.height = `${Math.min(view.input.scrollHeight, 160)}px`;
}
view.input.addEventListener("input", resizeInput);

// -- the activity rail ------------------------------------------------------------------

const RAIL_KEY = "chorus.rail";

function setRail(shown: boolean): void {
  view.rail.hidden = !shown;
  view.railToggle.setAttribute("aria-expanded", String(shown));
  document.body.classList.toggle("rail-open", shown);
}

view.railToggle.addEventListener("click", () => {
  const shown = view.rail.hidden;
  setRail(shown);
  localStorage.setItem(RAIL_KEY, shown ? "shown" : "hidden");
});

const stored = localStorage.getItem(RAIL_KEY);
setRail(stored === null ? window.matchMedia("(min-width: 760px)").matches : stored === "shown");

const agents = new Map<string, Agent>();

/** A task in the rail: running ones tick their elapsed time; the last few ended ones stay, dimmed. */
interface RailTask {
  id: string;
  kind: string;
  agent: string;
  since: number; // unix seconds
  ended: number | undefined;
  outcome: string; // "" while it runs, else succeeded / failed / cancelled
  message: string;
}
const tasks = new Map<string, RailTask>();
const MAX_ENDED_TASKS = 3;

interface DecisionLine {
  ts: number;
  who: string;
  what: string;
}
const decisions: DecisionLine[] = [];
const MAX_DECISIONS = 8;

function clock(ts: number): string {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
}

function elapsed(since: number): string {
  return duration(Date.now() / 1000 - since);
}

function renderAgents(): void {
  const items = [...agents.values()].sort((a, b) => a.name.localeCompare(b.name));
  view.agents.replaceChildren(
    ...items.map((agent) => {
      const li = make("li", `agent state-${agent.state.replace(/[^a-z_]/gi, "")}`);
      li.dataset.agent = agent.name;
      li.append(make("span", "name", agent.name), make("span", "state", agent.state));
      const detail = [
        agent.task ? `task ${agent.task.slice(0, 8)}` : "",
        agent.restarts > 0 ? `${agent.restarts} restart${agent.restarts > 1 ? "s" : ""}` : "",
        agent.last_heartbeat ? `seen ${elapsed(agent.last_heartbeat)} ago` : "",
      ].filter(Boolean);
      if (detail.length > 0) li.append(make("span", "detail", detail.join(" · ")));
      return li;
    }),
  );
}

function renderTasks(): void {
  const all = [...tasks.values()];
  const running = all.filter((t) => t.ended === undefined).sort((a, b) => a.since - b.since);
  const ended = all
    .filter((t) => t.ended !== undefined)
    .sort((a, b) => (b.ended ?? 0) - (a.ended ?? 0))
    .slice(0, MAX_ENDED_TASKS);
  for (const task of all) if (task.ended !== undefined && !ended.includes(task)) tasks.delete(task.id);
  if (running.length === 0 && ended.length === 0) {
    view.tasks.replaceChildren(make("li", "none", "none"));
    return;
  }
  view.tasks.replaceChildren(
    ...[...running, ...ended].map((task) => {
      const li = make("li", task.ended === undefined ? "task running" : `task ended ${task.outcome}`);
      li.dataset.task = task.id;
      const took = task.ended === undefined ? elapsed(task.since) : `${task.outcome} in ${duration(task.ended - task.since)}`;
      li.append(make("span", "name", task.agent || task.kind), make("span", "elapsed", took));
      if (task.message) li.append(make("span", "detail", task.message));
      return li;
    }),
  );
}

function renderDecisions(): void {
  if (decisions.length === 0) {
    view.decisions.replaceChildren(make("li", "none", "none yet"));
    return;
  }
  view.decisions.replaceChildren(
    ...decisions.map((d) => {
      const li = make("li", "decision");
      li.append(make("time", "", clock(d.ts)), make("span", "name", d.who), make("span", "detail", d.what));
      return li;
    }),
  );
}

function str(value: unknown): string {
  return typeof value === "string" ? value : "";
}

function addDecision(event: BusEvent): void {
  const body = event.body;
  const what =
    event.topic === "narrator.cue"
      ? `cue ${str(body.kind)}${body.speak_now === false ? " (hold)" : ""}: ${str(body.reason)}`
      : `${str(body.action)}: ${str(body.reason)}`;
  if (decisions.some((d) => d.ts === event.ts && d.what === what)) return;
  decisions.unshift({ ts: event.ts, who: event.sender, what });
  decisions.sort((a, b) => b.ts - a.ts);
  decisions.length = Math.min(decisions.length, MAX_DECISIONS);
  renderDecisions();
}

function onTaskNode(node: TaskNode): void {
  const ended = node.state === "succeeded" || node.state === "failed" || node.state === "cancelled";
  tasks.set(node.id, {
    id: node.id,
    kind: node.kind,
    agent: node.agent ?? "",
    since: node.started ?? node.created,
    ended: ended ? (node.finished ?? node.updated) : undefined,
    outcome: ended ? node.state : "",
    message: ended ? "" : node.state,
  });
}

function onEvent(event: BusEvent): void {
  const body = event.body;
  if (event.topic.startsWith("heartbeat.")) {
    const name = event.topic.slice("heartbeat.".length);
    const known = agents.get(name);
    agents.set(name, {
      name,
      state: str(body.state) || known?.state || "unknown",
      last_heartbeat: event.ts,
      task: typeof body.task === "string" ? body.task : null,
      restarts: known?.restarts ?? 0,
    });
    renderAgents();
  } else if (event.topic === "task.update") {
    const id = str(body.task);
    const state = str(body.state);
    const known = tasks.get(id);
    const outcome = { result: "succeeded", failed: "failed", cancelled: "cancelled" }[state] ?? "";
    tasks.set(id, {
      id,
      kind: known?.kind ?? "",
      agent: event.sender,
      since: known?.since ?? event.ts,
      ended: outcome ? event.ts : undefined,
      outcome,
      message: outcome === "failed" ? str(body.message) : outcome ? "" : str(body.message),
    });
    renderTasks();
  } else if (event.topic.startsWith("task.assign.")) {
    const id = str(body.task);
    const agent = event.topic.slice("task.assign.".length);
    tasks.set(id, { id, kind: str(body.kind), agent, since: event.ts, ended: undefined, outcome: "", message: "assigned" });
    renderTasks();
  } else if (event.topic === "narrator.decision" || event.topic === "narrator.cue") {
    addDecision(event);
  }
}

async function refreshAgents(): Promise<void> {
  for (const agent of await client.listAgents()) agents.set(agent.name, agent);
  renderAgents();
}

async function loadRail(): Promise<void> {
  await refreshAgents();
  const [nodes, recent] = await Promise.all([client.listTasks(), client.listDecisions({ limit: MAX_DECISIONS })]);
  for (const node of nodes) onTaskNode(node);
  renderTasks();
  for (const decision of recent) addDecision(decision);
}

async function followEvents(): Promise<void> {
  for (let backoff = 1000; ; backoff = Math.min(backoff * 2, 15_000)) {
    try {
      const feed = client.streamEvents({ prefix: ["heartbeat.", "task.", "narrator.decision", "narrator.cue"] });
      for await (const event of feed) {
        backoff = 1000;
        onEvent(event);
      }
    } catch (error) {
      if (handledAuth(error)) return;
    }
    await new Promise((r) => setTimeout(r, backoff));
  }
}

async function refreshHealth(): Promise<void> {
  try {
    const health = await client.health();
    view.health.textContent = `bus ${health.bus ? "up" : "down"} · engine ${health.engine ? "up" : "down"}`;
    view.health.className = `health ${health.bus && health.engine ? "ok" : "degraded"}`;
  } catch {
    view.health.textContent = "gateway unreachable";
    view.health.className = "health down";
  }
}

async function start(): Promise<void> {
  void refreshHealth();
  setInterval(() => void refreshHealth(), 10_000);
  try {
    await loadRail();
  } catch (error) {
    if (handledAuth(error)) return;
  }
  void followEvents();
  setInterval(() => {
    refreshAgents().catch(handledAuth); // states the heartbeats do not carry: silent, restarting, gave_up
  }, 5_000);
  setInterval(() => {
    renderTasks(); // elapsed times
  }, 1_000);
}

view.input.focus();
void start();
