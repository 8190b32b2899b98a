"""The ACL table: who may publish and read what, and which body each topic carries."""

from __future__ import annotations

import pytest

from runtime import acl
from runtime import messages as m


@pytest.mark.parametrize(
    ("identity", "topic"),
    [
        ("client", "user.in"),
        ("narrator", "user.out"),
        ("narrator-shadow", "shadow.user.out"),
        ("controller", "task.assign.coder"),
        ("coder", "task.update"),
        ("rag", "event.rag"),
        ("search", "heartbeat.search"),
        ("controller", "narrator.cue"),
        ("narrator", "narrator.decision"),
        ("engine", "engine.stats"),
        ("operator", "sys.config"),
        ("supervisor", "sys.restart"),
        ("narrator", "ack.controller"),
        ("controller", "ack.client"),
        ("rag", "ack.controller"),
        ("engine", "ack.engine"),
    ],
)
def test_allowed_publishers(identity: str, topic: str) -> None:
    assert acl.publish_violation(identity, topic) is None


@pytest.mark.parametrize(
    ("identity", "topic"),
    [
        ("coder", "user.out"),
        ("controller", "user.out"),
        ("narrator-shadow", "user.out"),
        ("client", "user.out"),
        ("monitor", "user.in"),
        ("coder", "task.assign.coder"),
        ("controller", "task.assign.nobody"),
        ("coder", "event.search"),
        ("coder", "heartbeat.rag"),
        ("coder", "narrator.cue"),
        ("narrator", "sys.config"),
        ("supervisor", "sys.config"),
        ("coder", "sys.restart"),
        ("coder", "nonsense.topic"),
        ("coder", "ack.nobody"),
        ("coder", "ack.client"),
        ("coder", "ack.narrator"),
        ("client", "ack.controller"),
        ("narrator-shadow", "ack.controller"),
        ("narrator-shadow", "narrator.decision"),
        ("monitor", "ack.monitor"),
    ],
)
def test_forbidden_publishers(identity: str, topic: str) -> None:
    assert acl.publish_violation(identity, topic) is not None


def test_every_reliable_topics_receiver_may_acknowledge_each_of_its_publishers() -> None:
    reliable = ["user.in", "narrator.cue", *(f"task.assign.{w}" for w in acl.WORKERS)]
    for topic in reliable:
        receiver = acl.receiver_of(topic)
        assert receiver is not None
        publishers = [i for i in acl.IDENTITIES if acl.publish_violation(i, topic) is None]
        assert publishers, topic
        for publisher in publishers:
            assert acl.publish_violation(receiver, acl.ack_topic(publisher)) is None


def test_subscriptions() -> None:
    assert acl.may_read("monitor", "")
    assert acl.may_read("coder", "task.assign.coder")
    assert acl.may_read("coder", "ack.coder")
    assert not acl.may_read("coder", "user.in")
    assert not acl.may_read("coder", "task.assign.")  # would read other agents' tasks
    assert not acl.may_read("coder", "")
    assert not acl.may_read("coder", "ack.controller")
    assert acl.may_read("client", "user.out")
    assert acl.may_read("narrator", "sys.started")  # to say its last chunks again
    assert not acl.may_read("narrator", "sys.restart")
    assert not acl.may_read("client", "task.update")


def test_bodies_must_match_topics() -> None:
    assert acl.body_mismatch("user.in", m.UserTurn(text="x")) is None
    assert acl.body_mismatch("user.in", m.Chunk(stream="s", seq=0, delta="")) is not None
    assert acl.body_mismatch("task.assign.coder", m.TaskCancel(task="t")) is None
    assert acl.body_mismatch("sys.restart", m.ProcessEvent(process="x")) is None
    assert acl.body_mismatch("sys.config", m.ProcessEvent(process="x")) is not None


def test_reliable_topics_name_their_receiver() -> None:
    assert acl.receiver_of("user.in") == "controller"
    assert acl.receiver_of("narrator.cue") == "narrator"
    assert acl.receiver_of("task.assign.rag") == "rag"
    assert acl.receiver_of("task.update") is None
