/**
 * The gateway's data, as the client hands it out.
 *
 * REST bodies come from the gateway's OpenAPI schema (`src/schema.d.ts`, generated
 * from the committed `openapi.json`). The SSE events are not described by OpenAPI,
 * so their data types are written here, after docs/http-api.md.
 */

/** `GET /healthz`. */
export interface Health {
  ok: boolean;
  bus: boolean;
  engine: boolean;
}

/** One agent in `GET /v1/agents`. */
export interface Agent {
  name: string;
  state: string;
  last_heartbeat: number | null;
  task: string | null;
  restarts: number;
}

/** A task-graph node, as in data/schemas/TaskNode.json. */
export interface TaskNode {
  id: string;
  kind: string;
  created: number;
  updated: number;
  state?: "queued" | "assigned" | "running" | "succeeded" | "failed" | "cancelled";
  agent?: string | null;
  conversation?: string | null;
  parent?: string | null;
  depends_on?: string[];
  attempts?: number;
  started?: number | null;
  finished?: number | null;
  result?: string | null;
  error?: string | null;
}

/** An envelope as JSON (the bus log, decisions, and each `/v1/events` event). */
export interface BusEvent {
  id: string;
  topic: string;
  sender: string;
  ts: number;
  conversation: string | null;
  task: string | null;
  body: Record<string, unknown>;
}

/** One piece of the narrator's stream. `notice` marks a playbook/system notice, not a model answer. */
export interface ChunkEvent {
  type: "chunk";
  conversation: string;
  stream: string;
  seq: number;
  delta: string;
  notice: boolean;
}

/** The end of one narrator stream; `closes_turn` ends the whole answer to the turn. */
export interface FinalEvent {
  type: "final";
  conversation: string;
  stream: string;
  finish: "done" | "error";
  sources: string[];
  closes_turn: boolean;
}

/** The turn was preempted (a newer turn on the same conversation), so nothing more comes. */
export interface InterruptedEvent {
  type: "interrupted";
  conversation: string;
  stream: string;
}

/** What `streamChat` yields, in order. */
export type ChatEvent = ChunkEvent | FinalEvent | InterruptedEvent;
