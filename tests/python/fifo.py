"""FIFO messages: three message groups, received in each group's order.

Usage: fifo.py <endpoint> <topic> <group> <per_group>
"""

from common import consumer, config, receive, run
from rocketmq import Message, Producer


def main(endpoint, topic, group, per_group):
    p = Producer(config(endpoint), (topic,))
    p.startup()
    n = 0
    for i in range(int(per_group)):
        for g in ("alpha", "beta", "gamma"):
            m = Message()
            m.topic = topic
            m.body = f"{g} {i}".encode()
            m.message_group = g
            p.send(m)
            n += 1
    c = consumer(endpoint, group, topic)
    got = receive(c, n)
    p.shutdown()
    c.shutdown()
    return {"received": [[b, g] for _, b, g in got]}


run(main)
