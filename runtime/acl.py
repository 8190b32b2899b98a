"""Who may publish and read which topic, and which body each topic carries.

The broker applies these rules to every message and every subscription, using the
identity that CURVE authenticated (never what a message says about itself).
"""

from __future__ import annotations

from . import messages as m

IDENTITIES: tuple[str, ...] = (
    "broker",
    "engine",
    "controller",
    "narrator",
    "coder",
    "search",
    "rag",
    "client",
    "monitor",
    "supervisor",
    "operator",
    "narrator-shadow",
)
WORKERS: tuple[str, ...] = ("coder", "search", "rag")
# processes that publish heartbeats and so may own an ``event.<name>`` and ``heartbeat.<name>``
AGENTS: tuple[str, ...] = ("controller", "narrator", "narrator-shadow", *WORKERS)
# identities allowed to call the engine's ROUTER socket (search never does: it has no need)
ENGINE_CALLERS: frozenset[str] = frozenset(
    {"controller", "narrator", "narrator-shadow", "coder", "rag", "engine", "operator"}
)

# what each identity may read (subscription prefixes); "" is everything
_READS: dict[str, tuple[str, ...]] = {
    "controller": (
        "user.in",
        "task.update",
        "heartbeat.",
        "sys.",
        "engine.stats",
        "event.",
        "narrator.decision",
    ),
    # user.in: to stop talking at once; sys.started: to say its last chunks again when the
    # broker is back (the one a dying broker held is lost)
    "narrator": ("narrator.cue", "user.in", "sys.config", "sys.started"),
    "narrator-shadow": ("narrator.cue", "sys.config", "sys.started"),
    "coder": ("task.assign.coder", "sys.config"),
    "search": ("task.assign.search", "sys.config"),
    "rag": ("task.assign.rag", "sys.config"),
    "client": ("user.out", "sys.rejected"),
    "monitor": ("",),
    "supervisor": ("heartbeat.", "sys.", "engine.stats"),
    "operator": ("sys.",),
    "engine": ("sys.config",),
    "broker": (),
}

# reliable topics and the identity that must acknowledge them
RELIABLE_PREFIXES: tuple[str, ...] = ("user.in", "task.assign.", "narrator.cue")


def receiver_of(topic: str) -> str | None:
    """The identity that acknowledges a reliable topic, or None if it is best-effort."""
    if topic == "user.in":
        return "controller"
    if topic == "narrator.cue":
        return "narrator"
    if topic.startswith("task.assign."):
        return topic.removeprefix("task.assign.")
    return None


# who acknowledges whom: each reliable topic's receiver (receiver_of) to the one identity
# that may publish that topic (user.in: client; task.assign.*, narrator.cue: controller)
_ACKNOWLEDGES: dict[str, str] = {
    "controller": "client",
    "narrator": "controller",
    **dict.fromkeys(WORKERS, "controller"),
}


def ack_topic(original_sender: str) -> str:
    """Where acknowledgements for ``original_sender``'s reliable messages go."""
    return f"ack.{original_sender}"


def may_read(identity: str, prefix: str) -> bool:
    """Whether ``identity`` may subscribe to ``prefix``: only to its own ack topic and
    to prefixes inside what its role reads."""
    if prefix == ack_topic(identity) or prefix.startswith(ack_topic(identity) + "."):
        return True
    return any(prefix.startswith(allowed) for allowed in _READS.get(identity, ()))


def publish_violation(identity: str, topic: str) -> str | None:
    """Why ``identity`` may not publish ``topic``, or None if it may."""
    parts = topic.split(".")
    root = parts[0]
    if identity == "monitor":
        return "monitor may only subscribe"
    if topic == "user.in":
        ok = identity == "client"
    elif topic == "user.out":
        ok = identity == "narrator"
    elif topic == "shadow.user.out":
        ok = identity == "narrator-shadow"
    elif root == "task" and len(parts) == 3 and parts[1] == "assign":
        ok = identity == "controller" and parts[2] in WORKERS
    elif topic == "task.update":
        ok = identity in WORKERS
    elif root == "event" and len(parts) == 2:
        ok = parts[1] == identity and identity in (*AGENTS, "engine", "client", "supervisor")
    elif root == "heartbeat" and len(parts) == 2:
        ok = parts[1] == identity and identity in AGENTS
    elif topic == "narrator.cue":
        ok = identity == "controller"
    elif topic == "narrator.decision":
        # not the shadow: its decisions would read as the narrator's to anyone watching
        # (it makes none; `runtime decisions --compare` reads its shadow.user.out)
        ok = identity in ("controller", "narrator")
    elif topic == "engine.stats":
        ok = identity == "engine"
    elif topic == "sys.config":
        ok = identity == "operator"
    elif topic == "sys.ping":
        ok = identity != "monitor"
    elif root == "sys" and len(parts) == 2:
        ok = identity in ("broker", "supervisor")
    elif root == "ack" and len(parts) == 2:
        # its own (the bus's readiness round trip), or that of the sender it acknowledges:
        # no one can stop another's re-sending by acknowledging what it never received
        ok = parts[1] == identity or _ACKNOWLEDGES.get(identity) == parts[1]
    else:
        return f"unknown topic {topic!r}"
    return None if ok else f"{identity} may not publish {topic}"


_BODY_FOR_ROOT: dict[str, tuple[type[m.Body], ...]] = {
    "user.in": (m.UserTurn,),
    "user.out": (m.Chunk,),
    "shadow.user.out": (m.Chunk,),
    "task.assign": (m.TaskAssign, m.TaskCancel),
    "task.update": (m.TaskUpdate,),
    "event": (m.Fault, m.Note, m.Rollout),
    "heartbeat": (m.Heartbeat,),
    "narrator.cue": (m.Cue,),
    "narrator.decision": (m.Decision,),
    "engine.stats": (m.EngineStats,),
    "sys.config": (m.ConfigChange,),
    "sys.ping": (m.Ping,),
    "sys.rejected": (m.Rejected,),
    "sys.violation": (m.Violation,),
    "sys": (m.ProcessEvent,),
    "ack": (m.Ack,),
}


def body_mismatch(topic: str, body: m.Body | type[m.Body]) -> str | None:
    """Why ``body`` (or a body type) does not belong on ``topic``, or None if it does."""
    kind = body if isinstance(body, type) else type(body)
    parts = topic.split(".")
    for key in (topic, ".".join(parts[:2]), parts[0]):
        allowed = _BODY_FOR_ROOT.get(key)
        if allowed is not None:
            if issubclass(kind, allowed):
                return None
            names = ", ".join(t.__name__ for t in allowed)
            return f"{topic} carries {names}, not {kind.__name__}"
    return f"unknown topic {topic!r}"
