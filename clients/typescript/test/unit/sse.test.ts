import { describe, expect, it } from "vitest";
import { readSse, SseParser, type ServerSentEvent } from "../../src/sse.js";

function parseAll(...pieces: string[]): ServerSentEvent[] {
  const parser = new SseParser();
  return [...pieces.flatMap((p) => parser.feed(p)), ...parser.end()];
}

function streamOf(...pieces: (string | Uint8Array)[]): ReadableStream<Uint8Array> {
  const encoder = new TextEncoder();
  return new ReadableStream({
    start(controller) {
      for (const p of pieces) controller.enqueue(typeof p === "string" ? encoder.encode(p) : p);
      controller.close();
    },
  });
}

describe("SseParser", () => {
  it("dispatches an event at the blank line, with its name and data", () => {
    expect(parseAll('event: chunk\ndata: {"delta":"hi"}\n\n')).toEqual([
      { event: "chunk", data: '{"delta":"hi"}', id: "" },
    ]);
  });

  it("names an event without an event field 'message'", () => {
    expect(parseAll("data: x\n\n")).toEqual([{ event: "message", data: "x", id: "" }]);
  });

  it("joins several data lines with newlines", () => {
    expect(parseAll("data: a\ndata:b\ndata\n\n")[0]?.data).toBe("a\nb\n");
  });

  it("accepts CRLF, LF and CR line ends, even a CRLF split across reads", () => {
    expect(parseAll("event: a\r\ndata: 1\r", "\n\r\nevent: b\rdata: 2\r\r")).toEqual([
      { event: "a", data: "1", id: "" },
      { event: "b", data: "2", id: "" },
    ]);
  });

  it("keeps a field split across reads whole", () => {
    expect(parseAll("ev", "ent: chu", "nk\nda", "ta: {\"seq\":", "1}\n", "\n")).toEqual([
      { event: "chunk", data: '{"seq":1}', id: "" },
    ]);
  });

  it("ignores comments (keep-alives), unknown fields and events without data", () => {
    expect(parseAll(": ping\n\nfoo: bar\nevent: empty\n\nevent: real\ndata: 1\n\n")).toEqual([
      { event: "real", data: "1", id: "" },
    ]);
  });

  it("removes only one space after the colon", () => {
    expect(parseAll("data:  two spaces\n\n")[0]?.data).toBe(" two spaces");
  });

  it("remembers the last id and the retry advice", () => {
    const parser = new SseParser();
    const events = parser.feed("id: 7\nretry: 1500\ndata: a\n\ndata: b\n\n");
    expect(events.map((e) => e.id)).toEqual(["7", "7"]);
    expect(parser.retry).toBe(1500);
  });

  it("drops an event the stream cut off before its blank line", () => {
    expect(parseAll("data: whole\n\ndata: cut off")).toEqual([
      { event: "message", data: "whole", id: "" },
    ]);
  });

  it("skips a leading byte-order mark", () => {
    expect(parseAll("\ufeffdata: x\n\n")[0]?.data).toBe("x");
  });
});

describe("readSse", () => {
  it("decodes UTF-8 split inside a character across chunks", async () => {
    const bytes = new TextEncoder().encode("data: héllo ✓\n\n");
    const events: ServerSentEvent[] = [];
    for await (const e of readSse(streamOf(bytes.slice(0, 8), bytes.slice(8, 16), bytes.slice(16)))) {
      events.push(e);
    }
    expect(events).toEqual([{ event: "message", data: "héllo ✓", id: "" }]);
  });

  it("cancels the body when the consumer stops early", async () => {
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        controller.enqueue(new TextEncoder().encode("data: tick\n\n"));
      },
      cancel() {
        cancelled = true;
      },
    });
    let seen = 0;
    for await (const _ of readSse(body)) {
      if (++seen === 3) break;
    }
    expect(seen).toBe(3);
    expect(cancelled).toBe(true);
  });
});
