"""NORMAL messages: send with tags and keys, receive and ack them all.

Usage: normal.py <endpoint> <topic> <group> <count>
"""

from common import consumer, config, receive, run
from rocketmq import Message, Producer


def main(endpoint, topic, group, count):
    p = Producer(config(endpoint), (topic,))
    p.startup()
    sent = []
    for i in range(int(count)):
        m = Message()
        m.topic = topic
        m.body = f"normal {i}".encode()
        m.tag = "even" if i % 2 == 0 else "odd"
        m.keys = f"k{i}"
        m.add_property("n", str(i))
        sent.append(p.send(m).message_id)
    c = consumer(endpoint, group, topic)
    got = receive(c, len(sent))
    p.shutdown()
    c.shutdown()
    return {"sent": sent, "received": [[i, b] for i, b, _ in got]}


run(main)
