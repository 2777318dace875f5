"""FIFO messages through a PushConsumer: the broker must tell the client
the subscription is FIFO (the client decides how to consume from the
settings the broker sends back), so that each message group is handled one
message at a time, and a message whose handler fails is retried before the
next message of its group is handed out.

Usage: fifo_push.py <endpoint> <topic> <group> <per_group>

Prints every call of the listener, in order: [[body, message_group], ...].
The handler fails the first call for "alpha 1".
"""

import threading
import time

from common import config, run
from rocketmq import ConsumeResult, FilterExpression, Message, MessageListener, Producer, PushConsumer


class Recorder(MessageListener):
    def __init__(self, want):
        self.lock = threading.Lock()
        self.calls = []
        self.failed_once = False
        self.successes = 0
        self.want = want
        self.done = threading.Event()

    def consume(self, message):
        body = message.body.decode()
        with self.lock:
            self.calls.append([body, message.message_group])
            if body == "alpha 1" and not self.failed_once:
                self.failed_once = True
                return ConsumeResult.FAILURE
            self.successes += 1
            if self.successes >= self.want:
                self.done.set()
        return ConsumeResult.SUCCESS


def main(endpoint, topic, group, per_group):
    per_group = int(per_group)
    p = Producer(config(endpoint), (topic,))
    p.startup()
    for i in range(per_group):
        for g in ("alpha", "beta", "gamma"):
            m = Message()
            m.topic = topic
            m.body = f"{g} {i}".encode()
            m.message_group = g
            p.send(m)
    listener = Recorder(3 * per_group)
    c = PushConsumer(config(endpoint), group, listener, {topic: FilterExpression("*")})
    c.startup()
    listener.done.wait(60)
    # A little longer: a message handed out again after its ack would show.
    time.sleep(2)
    with listener.lock:
        calls = list(listener.calls)
    c.shutdown()
    p.shutdown()
    return {"calls": calls}


run(main)
