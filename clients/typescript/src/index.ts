/** The Chorus gateway client: chat with the narrator, watch the bus, list agents and tasks. */
export { ChorusClient } from "./client.js";
export type {
  ChatOptions,
  ChatStream,
  ChorusClientOptions,
  DecisionsFilter,
  EventsOptions,
  LogsFilter,
  ResumeOptions,
  TasksFilter,
} from "./client.js";
export { ChorusAuthError, ChorusError, ChorusHttpError, ChorusStreamError, isAbortError } from "./errors.js";
export { readSse, SseParser } from "./sse.js";
export type { ServerSentEvent } from "./sse.js";
export type {
  Agent,
  BusEvent,
  ChatEvent,
  ChunkEvent,
  ErrorEvent,
  FinalEvent,
  Health,
  InterruptedEvent,
  TaskNode,
} from "./types.js";
export type { components, operations, paths } from "./schema.js";
