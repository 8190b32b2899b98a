import { describe, expect, inject, it } from "vitest";
import {
  ChorusAuthError,
  ChorusClient,
  ChorusHttpError,
  isAbortError,
  type BusEvent,
  type ChatEvent,
} from "../../src/index.js";

const { baseUrl, token } = inject("gateway");
const client = new ChorusClient({ baseUrl, token });
// the narrator's engine_down playbook line (prompts/playbooks.md): the instance has no engine
const ENGINE_DOWN = "The language model is restarting";

async function collect(stream: AsyncIterable<ChatEvent>): Promise<ChatEvent[]> {
  const events: ChatEvent[] = [];
  for await (const event of stream) events.push(event);
  return events;
}

describe("the client against a real gateway (no engine)", () => {
  it("health() reaches the bus and reports the engine down", async () => {
    expect(await client.health()).toEqual({ ok: true, bus: true, engine: false });
  });

  it("listAgents() lists the worker agents with their state", async () => {
    const agents = await client.listAgents();
    const names = agents.map((a) => a.name);
    expect(names).toEqual(expect.arrayContaining(["coder", "search", "rag"]));
    for (const agent of agents) {
      expect(typeof agent.state).toBe("string");
      expect(agent.restarts).toBeGreaterThanOrEqual(0);
    }
  });

  it("streamChat() streams the narrator's notice chunk by chunk, then a final that closes the turn", async () => {
    const stream = client.streamChat("Hello there, who are you?");
    const events = await collect(stream);
    const conversation = await stream.conversation;
    expect(conversation).not.toBe("");
    const chunks = events.filter((e) => e.type === "chunk");
    expect(chunks.length).toBeGreaterThan(0);
    const notice = chunks.filter((c) => c.notice).map((c) => c.delta).join("");
    expect(notice).toContain(ENGINE_DOWN);
    for (const event of events) expect(event.conversation).toBe(conversation);
    const last = events.at(-1);
    expect(last).toMatchObject({ type: "final", closes_turn: true });
    // every stream's chunks come in seq order and end with that stream's final
    const byStream = new Map<string, number[]>();
    for (const c of chunks) byStream.set(c.stream, [...(byStream.get(c.stream) ?? []), c.seq]);
    for (const seqs of byStream.values()) expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
    for (const id of byStream.keys()) {
      expect(events.some((e) => e.type === "final" && e.stream === id)).toBe(true);
    }
  });

  it("streamChat() continues a conversation it names", async () => {
    const first = client.streamChat("Hi!");
    await collect(first);
    const conversation = await first.conversation;
    const second = client.streamChat("Thanks, hello again!", { conversation });
    const events = await collect(second);
    expect(await second.conversation).toBe(conversation);
    expect(events.at(-1)).toMatchObject({ type: "final", closes_turn: true, conversation });
  });

  it("resumeChat() gives a turn's answer again, whole or after the last chunk seen", async () => {
    const stream = client.streamChat("Hello, are you there?");
    const events = await collect(stream);
    const conversation = await stream.conversation;
    expect(await collect(client.resumeChat(conversation))).toEqual(events);
    const chunks = events.filter((e) => e.type === "chunk");
    const first = chunks[0];
    if (first === undefined || first.type !== "chunk") throw new Error("the answer had no chunk");
    const rest = await collect(client.resumeChat(conversation, { stream: first.stream, after: first.seq }));
    expect(rest).toEqual(events.slice(events.indexOf(first) + 1));
    const gone = collect(client.resumeChat(conversation, { stream: "no-such-stream" }));
    await expect(gone).rejects.toMatchObject({ name: "ChorusHttpError", status: 404 });
  });

  it("streamChat() on a conversation the gateway never saw is a 404", async () => {
    const stream = client.streamChat("hi", { conversation: "never-seen-conversation" });
    await expect(collect(stream)).rejects.toMatchObject({ name: "ChorusHttpError", status: 404 });
  });

  it("streamChat() stops with an AbortError when its signal aborts", async () => {
    const abort = new AbortController();
    const stream = client.streamChat("Tell me a long story.", { signal: abort.signal });
    const iterator = stream[Symbol.asyncIterator]();
    const first = await iterator.next();
    expect(first.done).toBe(false);
    abort.abort();
    const rest = iterator.next();
    await expect(rest).rejects.toSatisfy(isAbortError);
    // aborted before the response arrived: fetch itself rejects
    const early = new AbortController();
    const pending = client.streamChat("again", { signal: early.signal })[Symbol.asyncIterator]().next();
    early.abort();
    await expect(pending).rejects.toSatisfy(isAbortError);
    expect((await client.health()).ok).toBe(true);
  });

  it("a second turn on the same conversation preempts the first, which ends with interrupted", async () => {
    // a documentation question keeps its turn open (agents work; without an engine no answer comes)
    const first = client.streamChat("Search the docs for the assert statement.");
    const firstEvents: ChatEvent[] = [];
    const iterator = first[Symbol.asyncIterator]();
    const head = await iterator.next(); // the acknowledgement: the turn is under way
    expect(head.done).toBe(false);
    const rest = (async () => {
      for (let next = await iterator.next(); !next.done; next = await iterator.next()) firstEvents.push(next.value);
    })();
    const conversation = await first.conversation;
    const second = await collect(client.streamChat("Thanks, hello again!", { conversation }));
    await rest;
    expect(firstEvents.at(-1)).toMatchObject({ type: "interrupted", conversation });
    expect(second.at(-1)).toMatchObject({ type: "final", closes_turn: true, conversation });
  });

  it("streamEvents() yields only the topics of its prefix filter", async () => {
    const abort = new AbortController();
    const seen: BusEvent[] = [];
    const feed = client.streamEvents({ prefix: ["heartbeat.coder", "heartbeat.rag"], signal: abort.signal });
    await expect(
      (async () => {
        for await (const event of feed) {
          seen.push(event);
          if (new Set(seen.map((e) => e.topic)).size === 2) abort.abort();
        }
      })(),
    ).rejects.toSatisfy(isAbortError);
    expect(new Set(seen.map((e) => e.topic))).toEqual(new Set(["heartbeat.coder", "heartbeat.rag"]));
    for (const event of seen) {
      expect(event.sender).toBe(event.topic.slice("heartbeat.".length));
      expect(event.body).toMatchObject({ type: "Heartbeat" });
    }
  });

  it("streamEvents() shows a chat turn's decisions as they happen", async () => {
    const abort = new AbortController();
    const decisions: BusEvent[] = [];
    let live!: () => void;
    const subscribed = new Promise<void>((resolve) => (live = resolve));
    const following = (async () => {
      const feed = client.streamEvents({ prefix: ["narrator.decision", "heartbeat.narrator"], signal: abort.signal });
      for await (const event of feed) {
        if (event.topic === "heartbeat.narrator") live(); // the feed is subscribed: the turn's decisions will show
        if (event.topic !== "narrator.decision") continue;
        decisions.push(event);
      }
    })().catch((error: unknown) => {
      if (!isAbortError(error)) throw error;
    });
    await subscribed;
    const chat = client.streamChat("What can you do?");
    await collect(chat);
    const conversation = await chat.conversation;
    const ours = () => decisions.filter((d) => d.conversation === conversation).map((d) => d.body.action);
    await expect.poll(ours, { timeout: 15_000 }).toContain("finished");
    abort.abort();
    await following;
    expect(ours()).toContain("spoken");
    expect(decisions.every((d) => d.sender === "narrator" || d.sender === "controller")).toBe(true);
  });

  it("listTasks() and listDecisions() return the task graph and the decisions", async () => {
    const tasks = await client.listTasks();
    expect(Array.isArray(tasks)).toBe(true);
    for (const task of tasks) expect(task).toMatchObject({ id: expect.any(String), kind: expect.any(String) });
    for (const task of await client.listTasks({ state: ["succeeded"] })) expect(task.state).toBe("succeeded");
    const decisions = await client.listDecisions({ limit: 5 });
    expect(decisions.length).toBeGreaterThan(0);
    expect(decisions.length).toBeLessThanOrEqual(5);
    expect(decisions.every((d) => d.topic === "narrator.decision")).toBe(true);
  });

  it("a wrong or missing token is a ChorusAuthError (401) with the gateway's message", async () => {
    for (const wrong of [new ChorusClient({ baseUrl, token: "not-the-token" }), new ChorusClient({ baseUrl })]) {
      const error = await wrong.listAgents().catch((e: unknown) => e);
      expect(error).toBeInstanceOf(ChorusAuthError);
      expect(error).toBeInstanceOf(ChorusHttpError);
      expect((error as ChorusAuthError).status).toBe(401);
      expect((error as ChorusAuthError).message).not.toBe("");
      await expect(collect(wrong.streamChat("hi"))).rejects.toBeInstanceOf(ChorusAuthError);
    }
    // /healthz needs no token
    expect((await new ChorusClient({ baseUrl }).health()).ok).toBe(true);
  });
});
