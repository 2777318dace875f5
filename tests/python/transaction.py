"""TRANSACTION messages: commit, rollback, and two transactions left open
that the broker checks back; the checker commits bodies starting with
"commit" and rolls back those starting with "rollback".

Usage: transaction.py <endpoint> <topic> <group>
"""

import threading
import time

from common import consumer, config, receive, run
from rocketmq import Message, Producer, TransactionChecker, TransactionResolution


class Checker(TransactionChecker):
    def __init__(self):
        self.lock = threading.Lock()
        self.asked = []

    def check(self, message):
        body = message.body.decode()
        with self.lock:
            self.asked.append(body)
        if body.startswith("commit"):
            return TransactionResolution.COMMIT
        if body.startswith("rollback"):
            return TransactionResolution.ROLLBACK
        return TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED


def message(topic, body):
    m = Message()
    m.topic = topic
    m.body = body.encode()
    return m


def main(endpoint, topic, group):
    checker = Checker()
    p = Producer(config(endpoint), (topic,), checker)
    p.startup()
    c = consumer(endpoint, group, topic)

    tx = p.begin_transaction()
    p.send(message(topic, "explicit commit"), tx)
    # Invisible until committed.
    early = [b for _, b, _ in receive(c, 0)]
    tx.commit()

    tx = p.begin_transaction()
    p.send(message(topic, "explicit rollback"), tx)
    tx.rollback()

    for body in ("commit when asked", "rollback when asked"):
        p.send(message(topic, body), p.begin_transaction())

    got = receive(c, 2)
    # Both open transactions were checked back.
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with checker.lock:
            if {"commit when asked", "rollback when asked"} <= set(checker.asked):
                break
        time.sleep(0.1)
    with checker.lock:
        asked = sorted(set(checker.asked))
    p.shutdown()
    c.shutdown()
    return {"early": early, "received": sorted(b for _, b, _ in got), "asked": asked}


run(main)
