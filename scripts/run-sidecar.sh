#!/usr/bin/env bash
# Start Chorus beside a host app: every process plus the HTTP gateway (`launch --serve`).
# Settings: flags given here > CHORUS_* variables > the env file (--env-file PATH,
# $CHORUS_ENV_FILE, or ./.env.sidecar in the working directory) > defaults. Relative
# paths (the data directory) are taken from the working directory, so a host app runs
# this from its own folder. Extra arguments go to `launch`, e.g. --no-engine.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
    echo "run-sidecar: $root/.venv is missing; run \`make setup\` in $root first (it installs the pinned packages)" >&2
    exit 1
fi
# exec: SIGTERM/SIGINT reach launch itself, which stops every child in order
exec "$python" -m runtime launch --serve "$@"
