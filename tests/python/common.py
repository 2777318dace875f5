"""Shared helpers for the Python-client end-to-end scripts.

Each script drives the official Apache RocketMQ Python client
(`rocketmq-python-client`) against a KeelMQ broker on loopback, prints one
JSON line with what it observed on stdout, and exits 0; any failure is a
traceback on stderr and exit status 1. The Rust test
(tests/tests/python_client.rs) starts the broker and checks the JSON.
"""

import json
import os
import sys
import time
import traceback

from rocketmq import ClientConfiguration, Credentials, FilterExpression, SimpleConsumer


def config(endpoint):
    return ClientConfiguration(endpoint, Credentials(), request_timeout=5)


def consumer(endpoint, group, topic):
    c = SimpleConsumer(config(endpoint), group, {topic: FilterExpression("*")}, await_duration=5)
    c.startup()
    return c


def receive(c, want, deadline_s=60):
    """Receives and acks until `want` messages arrived or the deadline
    passed, then once more to catch extras. Returns [(message_id, body, group)]."""
    got = []
    end = time.monotonic() + deadline_s
    extra_round = False
    while True:
        if len(got) >= want:
            if extra_round:
                break
            extra_round = True
        elif time.monotonic() > end:
            break
        for m in c.receive(32, 15):
            got.append((m.message_id, m.body.decode(), m.message_group))
            c.ack(m)
        if extra_round:
            break
    return got


def run(main):
    """Runs `main` and exits: the client's worker threads would otherwise
    keep the interpreter alive."""
    try:
        result = main(*sys.argv[1:])
        print(json.dumps(result), flush=True)
        code = 0
    except Exception:  # noqa: BLE001 - any failure fails the test
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    os._exit(code)
