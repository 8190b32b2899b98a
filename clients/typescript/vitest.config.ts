import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // one gateway under test and a browser on a small machine: files run one after another
    fileParallelism: false,
    projects: [
      {
        test: {
          name: "unit",
          include: ["test/unit/**/*.test.ts"],
        },
      },
      {
        // the client and the page against a real gateway (test/gateway/setup.ts starts it)
        test: {
          name: "gateway",
          include: ["test/gateway/**/*.test.ts"],
          globalSetup: ["test/gateway/setup.ts"],
          testTimeout: 60_000,
          hookTimeout: 120_000,
        },
      },
    ],
  },
});
