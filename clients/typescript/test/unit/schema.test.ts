import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { expect, it } from "vitest";

const PACKAGE = resolve(import.meta.dirname, "../..");

it("src/schema.ts is what openapi-typescript makes of the committed openapi.json (else: npm run schema)", () => {
  const dir = mkdtempSync(join(tmpdir(), "chorus-schema-"));
  try {
    const out = join(dir, "schema.ts");
    execFileSync(join(PACKAGE, "node_modules/.bin/openapi-typescript"), ["openapi.json", "-o", out], {
      cwd: PACKAGE,
      stdio: "ignore",
    });
    expect(readFileSync(join(PACKAGE, "src/schema.ts"), "utf8")).toBe(readFileSync(out, "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
