#!/usr/bin/env python3
"""Produce the wire-compatibility fixtures used by proto/tests/wire.rs.

Everything here is built with the *official* RocketMQ Python client's generated
protobuf code (package `rocketmq-python-client`, module
`rocketmq.grpc_protocol`), so the bytes are what a real client puts on the wire.

Regenerate (from the repository root):

    python3 -m venv /tmp/rmq-venv
    /tmp/rmq-venv/bin/pip install rocketmq-python-client==5.1.2
    /tmp/rmq-venv/bin/python proto/tests/wire_vectors.py proto/tests/data/rocketmq-python-client-5.1.2.desc

It writes the client's FileDescriptorSet (definition/service/admin) to the
given path and prints Rust constants on stdout; paste them over the block
between `BEGIN GENERATED` and `END GENERATED` in proto/tests/wire.rs.
"""

import hashlib
import sys
import zlib

from google.protobuf import descriptor_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rocketmq.grpc_protocol import admin_pb2, definition_pb2 as d, service_pb2 as s

BODY = b"hello keelmq"
GZ_BODY = b"compressed?"  # not really gzip: only the encoding flag matters here


def vectors():
    out = []

    # 1. Producer -> broker: SendMessage with one FIFO message (decode test).
    send = s.SendMessageRequest(messages=[d.Message(
        topic=d.Resource(resource_namespace="ns1", name="TopicA"),
        user_properties={"color": "red", "size": "L"},
        system_properties=d.SystemProperties(
            tag="TagA",
            keys=["k1", "k2"],
            message_id="0100163E0A0B0C0D0E00000000000000AB",
            body_digest=d.Digest(type=d.CRC32, checksum="%08X" % zlib.crc32(BODY)),
            body_encoding=d.IDENTITY,
            message_type=d.FIFO,
            born_timestamp=Timestamp(seconds=1700000000, nanos=123000000),
            born_host="10.1.2.3",
            queue_id=3,
            message_group="order-42",
            trace_context="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            orphaned_transaction_recovery_duration=Duration(seconds=30),
            priority=7,
        ),
        body=BODY,
    )])
    out.append(("SEND_MESSAGE_REQUEST", send))

    # 2. Consumer -> broker: ReceiveMessage (decode test).
    recv = s.ReceiveMessageRequest(
        group=d.Resource(name="GroupA"),
        message_queue=d.MessageQueue(
            topic=d.Resource(resource_namespace="ns1", name="TopicA"),
            id=1,
            permission=d.READ_WRITE,
            broker=d.Broker(name="broker-a", id=0, endpoints=d.Endpoints(
                scheme=d.IPv4, addresses=[d.Address(host="127.0.0.1", port=8081)])),
            accept_message_types=[d.NORMAL, d.FIFO],
        ),
        filter_expression=d.FilterExpression(type=d.TAG, expression="TagA||TagB"),
        batch_size=32,
        invisible_duration=Duration(seconds=30),
        auto_renew=True,
        long_polling_timeout=Duration(seconds=20),
        attempt_id="attempt-1",
    )
    out.append(("RECEIVE_MESSAGE_REQUEST", recv))

    # 3. Producer -> broker: first Telemetry frame, the producer's Settings
    #    (decode test).
    tel_prod = s.TelemetryCommand(settings=d.Settings(
        client_type=d.PRODUCER,
        access_point=d.Endpoints(scheme=d.DOMAIN_NAME,
                                 addresses=[d.Address(host="broker.example", port=8081)]),
        backoff_policy=d.RetryPolicy(max_attempts=3, exponential_backoff=d.ExponentialBackoff(
            initial=Duration(nanos=10_000_000), max=Duration(seconds=1), multiplier=2.0)),
        request_timeout=Duration(seconds=3),
        publishing=d.Publishing(topics=[d.Resource(name="TopicA")],
                                max_body_size=4 * 1024 * 1024, validate_message_type=True),
        user_agent=d.UA(language=d.PYTHON, version="5.1.2", platform="Linux", hostname="host-1"),
        metric=d.Metric(on=False),
    ))
    out.append(("TELEMETRY_PRODUCER_SETTINGS", tel_prod))

    # 4. Broker -> consumer: merged Settings reply (encode test). `fifo=False`
    #    is set explicitly: a proto3 `optional` field must still be sent.
    tel_cons = s.TelemetryCommand(
        status=d.Status(code=d.OK, message="OK"),
        settings=d.Settings(
            client_type=d.SIMPLE_CONSUMER,
            backoff_policy=d.RetryPolicy(max_attempts=17, customized_backoff=d.CustomizedBackoff(
                next=[Duration(seconds=1), Duration(seconds=5), Duration(seconds=10)])),
            request_timeout=Duration(seconds=3),
            subscription=d.Subscription(
                group=d.Resource(name="GroupA"),
                subscriptions=[d.SubscriptionEntry(
                    topic=d.Resource(name="TopicA"),
                    expression=d.FilterExpression(type=d.SQL, expression="a > 1"))],
                fifo=False,
                receive_batch_size=32,
                long_polling_timeout=Duration(seconds=20),
                lite_subscription_quota=100,
                max_lite_topic_size=64,
            ),
        ))
    out.append(("TELEMETRY_CONSUMER_SETTINGS_REPLY", tel_cons))

    # 5. Broker -> producer: SendMessage refused, topic unknown (encode test).
    send_resp = s.SendMessageResponse(
        status=d.Status(code=d.TOPIC_NOT_FOUND, message="topic TopicX does not exist"),
        entries=[s.SendResultEntry(
            status=d.Status(code=d.TOPIC_NOT_FOUND, message="topic TopicX does not exist"),
            message_id="0100163E0A0B0C0D0E00000000000000AB")],
    )
    out.append(("SEND_MESSAGE_RESPONSE_TOPIC_NOT_FOUND", send_resp))

    # 6. Broker -> producer: SendMessage accepted (encode test).
    send_ok = s.SendMessageResponse(
        status=d.Status(code=d.OK, message="OK"),
        entries=[s.SendResultEntry(
            status=d.Status(code=d.OK, message="OK"),
            message_id="0100163E0A0B0C0D0E00000000000000AB",
            transaction_id="tx-1", offset=12345, recall_handle="recall-1")],
    )
    out.append(("SEND_MESSAGE_RESPONSE_OK", send_ok))

    # 7. Broker -> consumer: one message frame of the ReceiveMessage stream,
    #    with every server-side system property set (encode test).
    frame = s.ReceiveMessageResponse(message=d.Message(
        topic=d.Resource(name="TopicA"),
        user_properties={"color": "red"},
        system_properties=d.SystemProperties(
            tag="TagB",
            keys=["k3"],
            message_id="0100163E0A0B0C0D0E00000000000000CD",
            body_digest=d.Digest(type=d.MD5, checksum=hashlib.md5(GZ_BODY).hexdigest().upper()),
            body_encoding=d.GZIP,
            message_type=d.DELAY,
            born_timestamp=Timestamp(seconds=1700000000, nanos=5),
            born_host="10.1.2.3",
            store_timestamp=Timestamp(seconds=1700000001),
            store_host="10.9.9.9:10911",
            delivery_timestamp=Timestamp(seconds=1700000060),
            receipt_handle="handle-1",
            queue_id=2,
            queue_offset=0,
            invisible_duration=Duration(seconds=30),
            delivery_attempt=1,
            trace_context="",
            dead_letter_queue=d.DeadLetterQueue(topic="TopicOrig", message_id="orig-id"),
            lite_topic="lite-1",
            priority=0,
        ),
        body=GZ_BODY,
    ))
    out.append(("RECEIVE_MESSAGE_RESPONSE_MESSAGE", frame))

    # 8. Broker -> consumer: the status frame of an empty long poll and the
    #    delivery-timestamp frame (encode tests).
    out.append(("RECEIVE_MESSAGE_RESPONSE_NOT_FOUND", s.ReceiveMessageResponse(
        status=d.Status(code=d.MESSAGE_NOT_FOUND, message="no new message"))))
    out.append(("RECEIVE_MESSAGE_RESPONSE_DELIVERY_TIMESTAMP", s.ReceiveMessageResponse(
        delivery_timestamp=Timestamp(seconds=1700000002, nanos=250000000))))

    # 9. Broker -> client: a route (encode test).
    route = s.QueryRouteResponse(
        status=d.Status(code=d.OK, message="OK"),
        message_queues=[d.MessageQueue(
            topic=d.Resource(name="TopicA"), id=q, permission=d.READ_WRITE,
            broker=d.Broker(name="broker-a", id=0, endpoints=d.Endpoints(
                scheme=d.IPv4, addresses=[d.Address(host="127.0.0.1", port=8081)])),
            accept_message_types=[d.NORMAL]) for q in (0, 1)],
    )
    out.append(("QUERY_ROUTE_RESPONSE", route))

    # 10. Broker -> producer: transaction check-back on Telemetry (encode test).
    check = s.TelemetryCommand(recover_orphaned_transaction_command=s.RecoverOrphanedTransactionCommand(
        message=d.Message(
            topic=d.Resource(name="TopicT"),
            system_properties=d.SystemProperties(
                message_id="0100163E0A0B0C0D0E00000000000000EF",
                message_type=d.TRANSACTION),
            body=b"tx"),
        transaction_id="tx-9"))
    out.append(("TELEMETRY_RECOVER_ORPHANED_TRANSACTION", check))

    # 11. Producer -> broker: the check-back answer (decode test).
    end = s.EndTransactionRequest(
        topic=d.Resource(name="TopicT"), message_id="0100163E0A0B0C0D0E00000000000000EF",
        transaction_id="tx-9", resolution=d.COMMIT, source=d.SOURCE_SERVER_CHECK,
        trace_context="tc")
    out.append(("END_TRANSACTION_REQUEST", end))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: wire_vectors.py OUTPUT.desc")
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (d, s, admin_pb2):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
    with open(sys.argv[1], "wb") as f:
        f.write(fds.SerializeToString(deterministic=True))

    print("// BEGIN GENERATED by proto/tests/wire_vectors.py (rocketmq-python-client 5.1.2)")
    for name, msg in vectors():
        data = msg.SerializeToString(deterministic=True)
        print("const %s: &str = \"%s\";" % (name, data.hex()))
    print("// END GENERATED")


if __name__ == "__main__":
    main()
