"""Children of the supervisor end when it does, even when it is killed with SIGKILL.

The supervisor puts its pid in ``CHORUS_SUPERVISOR_PID`` in each child's environment.
The child calls :func:`die_with_parent` first thing: on Linux,
``prctl(PR_SET_PDEATHSIG, SIGTERM)`` has the kernel send it SIGTERM when its parent
dies, and it shuts down as on any SIGTERM (agents fail the tasks they hold, the engine
closes). A parent already gone by then means an immediate SIGTERM. The variable is
removed from the environment, so the child's own children (the coder's sandboxes) are
not tied to a process that is not their parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "CHORUS_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Tie this process to the supervisor that started it; False where that is not
    possible (not started by a supervisor, or not Linux)."""
    expected = os.environ.pop(ENV, "")
    if not expected.isdigit() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != int(expected):  # the supervisor died before we got here
        os.kill(os.getpid(), sig)
    return True
