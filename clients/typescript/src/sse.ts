/**
 * Server-Sent Events read from a `fetch` response body, so the same code runs in
 * browsers and Node 20 and can send an `Authorization` header (`EventSource` cannot).
 *
 * Follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; `:` starts a
 * comment; `data` lines are joined with "\n"; a blank line dispatches the event; an
 * event with no data is dropped; a leading BOM is ignored.
 */

/** One dispatched event: its name (default "message"), its data, and its last id. */
export interface ServerSentEvent {
  event: string;
  data: string;
  id: string;
}

/** Incremental parser: feed it text as it arrives, collect the events it completes. */
export class SseParser {
  private buffer = "";
  private started = false;
  private eventName = "";
  private dataLines: string[] = [];
  private hasData = false;
  private lastId = "";
  /** The server's `retry:` advice in milliseconds, if it sent one. */
  retry: number | undefined;

  /** Parse `text` (any slice of the stream) and return the events it completed. */
  feed(text: string): ServerSentEvent[] {
    if (!this.started && text.length > 0) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.buffer += text;
    const events: ServerSentEvent[] = [];
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf("\r", start);
      const lf = this.buffer.indexOf("\n", start);
      if (cr === -1 && lf === -1) break;
      let end: number;
      let next: number;
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        // a CR at the very end may be the first half of a CRLF still in flight
        if (cr === this.buffer.length - 1) break;
        end = cr;
        next = this.buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
      } else {
        end = lf;
        next = lf + 1;
      }
      const event = this.line(this.buffer.slice(start, end));
      if (event) events.push(event);
      start = next;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /**
   * The stream ended: a line held back for ending in CR is complete after all, and an
   * event not closed by a blank line is dropped, as the spec says.
   */
  end(): ServerSentEvent[] {
    const held = this.buffer;
    this.buffer = "";
    const event = held.endsWith("\r") ? this.line(held.slice(0, -1)) : undefined;
    this.reset();
    return event ? [event] : [];
  }

  private line(line: string): ServerSentEvent | undefined {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return undefined;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "event":
        this.eventName = value;
        break;
      case "data":
        this.dataLines.push(value);
        this.hasData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.lastId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        break; // unknown fields are ignored
    }
    return undefined;
  }

  private dispatch(): ServerSentEvent | undefined {
    const event = this.hasData
      ? { event: this.eventName || "message", data: this.dataLines.join("\n"), id: this.lastId }
      : undefined;
    this.reset();
    return event;
  }

  private reset(): void {
    this.eventName = "";
    this.dataLines = [];
    this.hasData = false;
  }
}

/** The events of a response body, in order, until the server ends the stream. */
export async function* readSse(body: ReadableStream<Uint8Array>): AsyncGenerator<ServerSentEvent> {
  const parser = new SseParser();
  const decoder = new TextDecoder("utf-8");
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      yield* parser.feed(decoder.decode(value, { stream: true }));
    }
    yield* parser.feed(decoder.decode());
    yield* parser.end();
  } finally {
    // stops the download when the consumer breaks out early; a no-op after the end
    await reader.cancel().catch(() => undefined);
    reader.releaseLock();
  }
}
