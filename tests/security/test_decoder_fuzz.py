"""The bus's msgpack envelope decoder (``runtime.messages.decode``) under hypothesis: on
any input it returns an Envelope or raises its documented ``msgspec.DecodeError``
(``ValidationError`` is one), never anything else, so no reader of the bus (the broker
first) can be taken down by what a peer sends. The engine's request decoding is held
to the same through its real socket."""

from __future__ import annotations

import anyio
import msgspec
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.client import Client
from engine.server import EngineServer
from runtime import messages as m
from runtime.keys import curve_client, load_public
from runtime.paths import DataDir
from tests.runtime.test_messages import SAMPLES

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)
VALID = [m.encode(m.Stamper("coder").stamp("event.coder", b, conversation="c")) for b in SAMPLES]

# msgpack-shaped values: what a peer can put in any field
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["id", "topic", "sender", "ts", "seq", "body", "conversation", "task", "type", "text"]


def decodes_or_raises_decode_error(payload: bytes) -> None:
    try:
        envelope = m.decode(payload)
    except msgspec.DecodeError:
        return
    assert isinstance(envelope, m.Envelope)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(payload: bytes) -> None:
    decodes_or_raises_decode_error(payload)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_valid_envelopes_with_bytes_changed_cut_or_added(valid: bytes, data: st.DataObject) -> None:
    payload = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    tail = data.draw(st.binary(max_size=16))
    decodes_or_raises_decode_error(bytes(payload))
    decodes_or_raises_decode_error(bytes(payload[:cut]) + tail)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=10))
def test_msgpack_maps_of_any_shape(fields: dict[str, object]) -> None:
    decodes_or_raises_decode_error(msgspec.msgpack.encode(fields))


@FUZZ
@given(st.sampled_from(SAMPLES), st.sampled_from(FIELDS), values)
def test_envelopes_with_one_field_of_any_type(body: m.Body, name: str, value: object) -> None:
    envelope = msgspec.to_builtins(m.Stamper("coder").stamp("event.coder", body))
    target = envelope["body"] if name in ("type", "text") else envelope
    target[name] = value
    decodes_or_raises_decode_error(msgspec.msgpack.encode(envelope))


@FUZZ
@given(st.sampled_from(VALID), st.binary(min_size=1, max_size=8))
def test_strings_that_are_not_utf8(valid: bytes, junk: bytes) -> None:
    """msgspec itself raises UnicodeDecodeError here; the decoder must not."""
    topic = valid.index(b"event.coder")
    bad = b"\xff" + junk if junk[:1] < b"\x80" else junk
    body = valid[:topic] + bad[:11].ljust(11, b"\xfe") + valid[topic + 11 :]
    decodes_or_raises_decode_error(body)


def test_nesting_past_the_recursion_limit_is_a_decode_error() -> None:
    """msgspec recurses per level: deep nesting raised RecursionError (and stopped the
    broker) before ``decode`` turned it into a DecodeError."""
    valid = m.encode(m.Stamper("coder").stamp("event.coder", m.Note(name="x")))
    for depth in (100, 10_000, 100_000):
        nested = b"\x91" * depth + b"\xc0"
        as_data = msgspec.msgpack.encode({"deep": None})[:-1] + nested  # in Note.data
        in_data = valid.replace(b"\xa4data\x80", b"\xa4data" + as_data)
        skipped = bytes([valid[0] + 1]) + valid[1:] + msgspec.msgpack.encode("x") + nested
        for payload in (in_data, skipped):
            decodes_or_raises_decode_error(payload)


def test_every_valid_envelope_still_decodes_to_itself() -> None:
    for body in SAMPLES:
        envelope = m.Stamper("coder").stamp("event.coder", body, conversation="c", task="t")
        assert m.decode(m.encode(envelope)) == envelope


async def test_the_engine_answers_hostile_requests_and_keeps_serving(
    data: DataDir, engine: EngineServer
) -> None:
    """Undecodable, deeply nested and non-UTF-8 requests get a ``bad_request`` reply on
    the engine's real socket, and the engine goes on serving the next caller."""
    stats = msgspec.msgpack.encode({"type": "Stats", "id": "s"})
    hostile = [
        b"\xc1",
        stats[:-3],
        stats.replace(b"Stats", b"St\xffts"),
        b"\x83" + stats[1:] + msgspec.msgpack.encode("x") + b"\x91" * 100_000 + b"\xc0",
    ]
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    curve_client(sock, data.keys, "coder", load_public(data.keys, "engine"))
    sock.connect(data.ipc("engine"))
    try:
        with anyio.fail_after(30):
            for payload in hostile:
                await sock.send(payload)
                reply = msgspec.msgpack.decode(await sock.recv())
                assert reply["type"] == "Failed" and reply["kind"] == "bad_request", reply
    finally:
        sock.close(linger=0)
        ctx.term()
    assert engine.ready.is_set()
    async with Client.connect("narrator", data.root, timeout=10) as llm:
        assert (await llm.stats()).sessions == 0
