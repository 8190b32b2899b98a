/** The client's handling of what a real gateway rarely sends: error events, cut streams, odd bodies. */
import { describe, expect, it } from "vitest";
import { ChorusAuthError, ChorusClient, ChorusHttpError, ChorusStreamError, type ChatEvent } from "../../src/index.js";

interface Seen {
  url: string;
  init: RequestInit | undefined;
}

function fakeGateway(respond: (url: string) => Response): { client: ChorusClient; seen: Seen[] } {
  const seen: Seen[] = [];
  const fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const url = String(input);
    seen.push({ url, init });
    return respond(url);
  };
  return { client: new ChorusClient({ baseUrl: "http://gw/", token: "t0k", fetch }), seen };
}

function sse(text: string, headers: Record<string, string> = {}): Response {
  return new Response(text, { headers: { "Content-Type": "text/event-stream", ...headers } });
}

async function collect(stream: AsyncIterable<ChatEvent>): Promise<ChatEvent[]> {
  const events: ChatEvent[] = [];
  for await (const event of stream) events.push(event);
  return events;
}

const chunk = (delta: string, seq = 0) =>
  `event: chunk\ndata: ${JSON.stringify({ conversation: "c1", stream: "s1", seq, delta, notice: false })}\n\n`;
const final = (closes: boolean) =>
  `event: final\ndata: ${JSON.stringify({ conversation: "c1", stream: "s1", finish: "done", sources: [], closes_turn: closes })}\n\n`;

describe("ChorusClient", () => {
  it("posts the turn as JSON with the bearer token, and reads the conversation header", async () => {
    const { client, seen } = fakeGateway(() => sse(chunk("hi") + final(true), { "X-Chorus-Conversation": "c1" }));
    const stream = client.streamChat("hello");
    expect(await collect(stream)).toHaveLength(2);
    expect(await stream.conversation).toBe("c1");
    expect(seen[0]?.url).toBe("http://gw/v1/chat");
    expect(seen[0]?.init?.method).toBe("POST");
    expect(JSON.parse(String(seen[0]?.init?.body))).toEqual({ text: "hello", conversation: null });
    expect(new Headers(seen[0]?.init?.headers).get("Authorization")).toBe("Bearer t0k");
  });

  it("ends the iteration at the final that closes the turn, ignoring what follows and unknown events", async () => {
    const { client } = fakeGateway(() => sse(chunk("a") + "event: future\ndata: {}\n\n" + final(false) + chunk("b", 1) + final(true) + chunk("late", 2)));
    const events = await collect(client.streamChat("x"));
    expect(events.map((e) => e.type)).toEqual(["chunk", "final", "chunk", "final"]);
  });

  it("throws ChorusStreamError for an error event, and for a stream cut before its turn closed", async () => {
    const failing = fakeGateway(() => sse(chunk("a") + 'event: error\ndata: {"error": "no answer in time"}\n\n')).client;
    await expect(collect(failing.streamChat("x"))).rejects.toMatchObject({ message: "no answer in time", brokeOff: false });
    const cut = fakeGateway(() => sse(chunk("a") + final(false))).client;
    await expect(collect(cut.streamChat("x"))).rejects.toMatchObject({ name: "ChorusStreamError", brokeOff: true });
    // the connection fails while the body is read
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode(chunk("a")));
        controller.error(new TypeError("network error"));
      },
    });
    const failed = fakeGateway(() => new Response(body, { headers: { "Content-Type": "text/event-stream" } })).client;
    const error: unknown = await collect(failed.streamChat("x")).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ChorusStreamError);
    expect(error).toMatchObject({ brokeOff: true, message: "the chat stream broke off: TypeError: network error" });
  });

  it("asks for a turn's tail by stream and seq, and reads it as a chat stream", async () => {
    const { client, seen } = fakeGateway(() => sse(chunk("b", 1) + final(true)));
    const events = await collect(client.resumeChat("c 1", { stream: "s1", after: 0 }));
    expect(events.map((e) => e.type)).toEqual(["chunk", "final"]);
    expect(seen[0]?.url).toBe("http://gw/v1/chat/c%201/tail?stream=s1&after=0");
    expect(seen[0]?.init?.method).toBeUndefined();
  });

  it("turns 4xx into ChorusHttpError with the gateway's message, 401 into ChorusAuthError", async () => {
    const json = (status: number, body: unknown) => new Response(JSON.stringify(body), { status });
    const { client } = fakeGateway((url) =>
      url.includes("agents") ? json(401, { error: "missing or wrong token" }) : json(429, { error: "slow down" }),
    );
    await expect(client.listAgents()).rejects.toThrow(new ChorusAuthError(401, "missing or wrong token"));
    const error = await client.listTasks().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ChorusHttpError);
    expect(error).not.toBeInstanceOf(ChorusAuthError);
    expect(error).toMatchObject({ status: 429, message: "slow down" });
  });

  it("repeats list filters in the query string and leaves out empty ones", async () => {
    const { client, seen } = fakeGateway(() => Response.json({ tasks: [], entries: [] }));
    await client.listTasks({ state: ["running", "queued"], conversation: undefined });
    await client.listLogs({ since: "10m", topic: ["task.", "sys."], text: null, limit: 5 });
    expect(seen.map((s) => s.url)).toEqual([
      "http://gw/v1/tasks?state=running&state=queued",
      "http://gw/v1/logs?since=10m&topic=task.&topic=sys.&limit=5",
    ]);
  });

  it("streams events with repeated prefix parameters", async () => {
    const envelope = { id: "1", topic: "task.update", sender: "search", ts: 1, seq: 1, body: { type: "TaskUpdate" } };
    const { client, seen } = fakeGateway(() => sse(`: open\n\nevent: task.update\ndata: ${JSON.stringify(envelope)}\n\n`));
    const got = [];
    for await (const event of client.streamEvents({ prefix: ["task.", "sys."] })) got.push(event);
    expect(got).toEqual([envelope]);
    expect(seen[0]?.url).toBe("http://gw/v1/events?prefix=task.&prefix=sys.");
  });
});
