/** What a caller can act on: the gateway refused (HTTP status), the token is wrong, or a stream broke. */

/** Base class of every error this client throws (except `AbortError` from an aborted signal). */
export class ChorusError extends Error {
  override name = "ChorusError";
}

/** The gateway answered with a 4xx/5xx; `message` is its one-line JSON `error`. */
export class ChorusHttpError extends ChorusError {
  override name = "ChorusHttpError";
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** 401: the token is missing or wrong. Pass `token` to the client, or log in again with the URL the gateway printed. */
export class ChorusAuthError extends ChorusHttpError {
  override name = "ChorusAuthError";
}

/**
 * The chat stream ended with an `error` event, or broke off before its turn was closed
 * (`brokeOff`: the connection ended or failed; `resumeChat` can fetch the rest).
 */
export class ChorusStreamError extends ChorusError {
  override name = "ChorusStreamError";
  constructor(
    message: string,
    readonly brokeOff = false,
  ) {
    super(message);
  }
}

/** True for the error that `fetch` and the streams throw when their `AbortSignal` fires. */
export function isAbortError(error: unknown): boolean {
  return error instanceof Error && error.name === "AbortError";
}
