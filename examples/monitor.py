"""Watch a running Chorus from outside: plain pyzmq + msgpack, no Chorus code.

Everything this needs is in the data directory of the running instance:
``run/endpoints.json`` (where to connect, the broker's public key) and the monitor's
certificate ``keys/monitor.key_secret``. Copy those two files to watch from elsewhere.

    python examples/monitor.py data            # everything
    python examples/monitor.py data task. sys.  # only some topic prefixes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import zmq
import zmq.auth


def main(data_dir: str, prefixes: list[str]) -> None:
    data = Path(data_dir)
    endpoints = json.loads((data / "run" / "endpoints.json").read_text())
    public, secret = zmq.auth.load_certificate(str(data / "keys" / "monitor.key_secret"))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.curve_publickey, sub.curve_secretkey = public, secret
    sub.curve_serverkey = endpoints["broker_public_key"].encode()
    for prefix in prefixes or [""]:
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sub.connect(endpoints["sub"])
    try:
        while True:
            topic, payload = sub.recv_multipart()
            envelope = msgpack.unpackb(payload)
            body = envelope["body"]
            print(
                f"{envelope['ts']:.3f} {topic.decode():<22} {envelope['sender']:<12} {body['type']} {body}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data", sys.argv[2:])
