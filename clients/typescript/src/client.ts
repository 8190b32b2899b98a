import { ChorusAuthError, ChorusError, ChorusHttpError, ChorusStreamError, isAbortError } from "./errors.js";
import { readSse } from "./sse.js";
import type {
  Agent,
  BusEvent,
  ChatEvent,
  ChunkEvent,
  DecisionsQuery,
  FinalEvent,
  Health,
  InterruptedEvent,
  LogsQuery,
  TaskNode,
  TasksQuery,
} from "./types.js";

/** How to reach the gateway. */
export interface ChorusClientOptions {
  /** The gateway's origin, e.g. `http://127.0.0.1:8600`; "" (the default) means this page's origin. */
  baseUrl?: string;
  /** The bearer token (`data/keys/gateway.token`). Leave it out in the web page: the login cookie is sent instead. */
  token?: string;
  /** A `fetch` to use instead of the global one. */
  fetch?: typeof fetch;
}

/** Options of `streamChat`. */
export interface ChatOptions {
  /** Continue this conversation; the gateway makes a new one when left out. */
  conversation?: string;
  /** Abort the request and the stream (the gateway stops forwarding; the turn itself goes on). */
  signal?: AbortSignal;
}

/** The answer to one user turn: iterate it for chunk/final/interrupted events. */
export interface ChatStream extends AsyncIterable<ChatEvent> {
  /** The conversation id (the `X-Chorus-Conversation` header), known once the gateway answered. */
  readonly conversation: Promise<string>;
}

/** Options of `resumeChat`: where the client's last response broke off. */
export interface ResumeOptions {
  /** The last `stream` a chunk was seen of; left out, the conversation's latest turn from its start. */
  stream?: string;
  /** The last `seq` of that stream seen (default -1: all of it). */
  after?: number;
  signal?: AbortSignal;
}

/** Options of `streamEvents`. */
export interface EventsOptions {
  /** Topic prefixes (`task.`, `heartbeat.`, `sys.` …); the gateway's default feed when left out. */
  prefix?: string | string[];
  signal?: AbortSignal;
}

/** Filters of `listTasks`: `state` (one or more), `conversation`. */
export type TasksFilter = TasksQuery & { signal?: AbortSignal };

/** Filters of `listLogs`, as for `python -m runtime logs`: since, until, topic, sender, conversation, task, text, limit, order. */
export type LogsFilter = LogsQuery & { signal?: AbortSignal };

/** Filters of `listDecisions`: since, until, conversation, sender, limit, order. */
export type DecisionsFilter = DecisionsQuery & { signal?: AbortSignal };

type Query = Record<string, string | number | readonly (string | number)[] | null | undefined>;

/** A client of the Chorus HTTP gateway; works in browsers and Node 20. */
export class ChorusClient {
  private readonly baseUrl: string;
  private readonly token: string | undefined;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ChorusClientOptions = {}) {
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    this.token = options.token;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** `GET /healthz`: whether the gateway reaches the bus and the engine. Needs no token. */
  async health(signal?: AbortSignal): Promise<Health> {
    return (await this.json("/healthz", {}, signal)) as Health;
  }

  /** `GET /v1/agents`: each agent with its state, last heartbeat, current task and restarts. */
  async listAgents(signal?: AbortSignal): Promise<Agent[]> {
    return ((await this.json("/v1/agents", {}, signal)) as { agents: Agent[] }).agents;
  }

  /** `GET /v1/tasks`: task-graph nodes, optionally of one state or conversation. */
  async listTasks(filter: TasksFilter = {}): Promise<TaskNode[]> {
    const { signal, ...query } = filter;
    return ((await this.json("/v1/tasks", query, signal)) as { tasks: TaskNode[] }).tasks;
  }

  /** `GET /v1/logs`: bus-log entries. */
  async listLogs(filter: LogsFilter = {}): Promise<BusEvent[]> {
    const { signal, ...query } = filter;
    return ((await this.json("/v1/logs", query, signal)) as { entries: BusEvent[] }).entries;
  }

  /** `GET /v1/decisions`: the controller's and narrator's decisions. */
  async listDecisions(filter: DecisionsFilter = {}): Promise<BusEvent[]> {
    const { signal, ...query } = filter;
    return ((await this.json("/v1/decisions", query, signal)) as { decisions: BusEvent[] })
      .decisions;
  }

  /**
   * `POST /v1/chat`: send a user turn and stream the narrator's answer. The iteration
   * ends after the `final` event that closes the turn, or after `interrupted`; an
   * `error` event throws `ChorusStreamError`; an aborted `signal` throws `AbortError`.
   */
  streamChat(text: string, options: ChatOptions = {}): ChatStream {
    let resolveConversation!: (id: string) => void;
    let rejectConversation!: (error: unknown) => void;
    const conversation = new Promise<string>((resolve, reject) => {
      resolveConversation = resolve;
      rejectConversation = reject;
    });
    conversation.catch(() => undefined); // a caller that only iterates must not see an unhandled rejection
    const events = async function* (this: ChorusClient): AsyncGenerator<ChatEvent> {
      let response: Response;
      try {
        response = await this.request("/v1/chat", {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify({ text, conversation: options.conversation ?? null }),
          signal: options.signal,
        });
      } catch (error) {
        rejectConversation(error);
        throw error;
      }
      resolveConversation(response.headers.get("X-Chorus-Conversation") ?? options.conversation ?? "");
      yield* chatEvents(response, options.signal);
    }.call(this);
    return { conversation, [Symbol.asyncIterator]: () => events };
  }

  /**
   * `GET /v1/chat/{conversation}/tail`: the rest of an answer whose `streamChat` broke
   * off (pass the last chunk's `stream` and `seq`), or the latest turn's whole answer;
   * then live until the turn closes. The same events as `streamChat`; a 404
   * (`ChorusHttpError`) when the gateway no longer holds that stream.
   */
  async *resumeChat(conversation: string, options: ResumeOptions = {}): AsyncGenerator<ChatEvent> {
    const path = `/v1/chat/${encodeURIComponent(conversation)}/tail`;
    const response = await this.request(this.url(path, { stream: options.stream, after: options.after }), {
      headers: { Accept: "text/event-stream" },
      signal: options.signal,
    });
    yield* chatEvents(response, options.signal);
  }

  /** `GET /v1/events`: the live activity feed, one envelope per event, until aborted. */
  async *streamEvents(options: EventsOptions = {}): AsyncGenerator<BusEvent> {
    const prefixes = options.prefix === undefined ? [] : [options.prefix].flat();
    const response = await this.request(this.url("/v1/events", { prefix: prefixes }), {
      headers: { Accept: "text/event-stream" },
      signal: options.signal,
    });
    if (response.body === null) throw new ChorusStreamError("the gateway sent no stream");
    for await (const sse of readSse(response.body)) {
      options.signal?.throwIfAborted();
      if (sse.event === "error") {
        throw new ChorusStreamError(String((parseData(sse.data) as { error?: unknown }).error));
      }
      yield parseData(sse.data) as BusEvent;
    }
  }

  private url(path: string, query: Query): string {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value === undefined || value === null) continue;
      for (const item of [value].flat()) params.append(key, String(item));
    }
    const search = params.toString();
    return search ? `${path}?${search}` : path;
  }

  private async json(path: string, query: Query, signal?: AbortSignal): Promise<unknown> {
    const response = await this.request(this.url(path, query), {
      headers: { Accept: "application/json" },
      signal,
    });
    return response.json();
  }

  private async request(pathAndQuery: string, init: RequestInit): Promise<Response> {
    const headers = new Headers(init.headers);
    if (this.token !== undefined) headers.set("Authorization", `Bearer ${this.token}`);
    const response = await this.fetchImpl(this.baseUrl + pathAndQuery, {
      ...init,
      headers,
      credentials: "same-origin",
    });
    if (!response.ok) throw await httpError(response);
    return response;
  }
}

/** The chat events of a `POST /v1/chat` (or `/tail`) response, until the turn closes. */
async function* chatEvents(response: Response, signal: AbortSignal | undefined): AsyncGenerator<ChatEvent> {
  if (response.body === null) throw new ChorusStreamError("the gateway sent no stream");
  try {
    for await (const sse of readSse(response.body)) {
      // events parsed from one read are not yielded after an abort
      signal?.throwIfAborted();
      const data = parseData(sse.data);
      switch (sse.event) {
        case "chunk":
          yield { ...(data as Omit<ChunkEvent, "type">), type: "chunk" };
          break;
        case "final": {
          const final: FinalEvent = { ...(data as Omit<FinalEvent, "type">), type: "final" };
          yield final;
          if (final.closes_turn) return;
          break;
        }
        case "interrupted":
          yield { ...(data as Omit<InterruptedEvent, "type">), type: "interrupted" };
          return;
        case "error":
          throw new ChorusStreamError(String((data as { error?: unknown }).error ?? sse.data));
        default:
          break; // an event this client does not know yet
      }
    }
  } catch (error) {
    if (isAbortError(error) || error instanceof ChorusError) throw error;
    throw new ChorusStreamError(`the chat stream broke off: ${String(error)}`, true);
  }
  throw new ChorusStreamError("the chat stream ended before the turn was closed", true);
}

function parseData(data: string): unknown {
  try {
    return JSON.parse(data) as unknown;
  } catch {
    throw new ChorusStreamError(`the gateway sent an event that is not JSON: ${data.slice(0, 200)}`);
  }
}

async function httpError(response: Response): Promise<ChorusHttpError> {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = (await response.json()) as { error?: unknown; detail?: unknown };
    const detail = body.error ?? body.detail;
    if (detail !== undefined) message = typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch {
    // not JSON: keep the status line
  }
  return response.status === 401
    ? new ChorusAuthError(response.status, message)
    : new ChorusHttpError(response.status, message);
}
