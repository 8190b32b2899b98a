import { readFileSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { expect, inject, it } from "vitest";

const SNAPSHOT = resolve(import.meta.dirname, "../../openapi.json");
const { baseUrl } = inject("gateway");

it("the committed openapi.json is the live gateway's /openapi.json (else: CHORUS_UPDATE_OPENAPI=1 npm test, then npm run schema)", async () => {
  const response = await fetch(`${baseUrl}/openapi.json`);
  expect(response.status).toBe(200);
  const live: unknown = await response.json();
  if (process.env.CHORUS_UPDATE_OPENAPI === "1") {
    writeFileSync(SNAPSHOT, `${JSON.stringify(live, null, 2)}\n`);
  }
  expect(live).toEqual(JSON.parse(readFileSync(SNAPSHOT, "utf8")));
});
