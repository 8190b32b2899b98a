import { defineConfig } from "vite";

// The web chat page: web/ -> dist/web/index.html + dist/web/assets/, served by the gateway at `/`.
export default defineConfig({
  root: "web",
  base: "/",
  build: {
    outDir: "../dist/web",
    assetsDir: "assets",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
  },
});
