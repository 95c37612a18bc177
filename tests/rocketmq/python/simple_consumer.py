"""The official RocketMQ 5 Python simple consumer against txmq's gRPC API.

Usage: simple_consumer.py ENDPOINT TOPIC GROUP COUNT UNACKED

Receives COUNT messages of TOPIC with a 2 s invisible duration, acks all
but the one whose body is UNACKED, then receives again until that one
comes back (its invisible duration ran out) and acks it. Prints one JSON
object: the bodies, keys and tags of the first deliveries, and the
redelivered message's body and delivery attempt.
"""

import json
import sys
import time

from rocketmq import ClientConfiguration, Credentials, FilterExpression, SimpleConsumer

endpoint, topic, group, count, unacked = sys.argv[1:6]
count = int(count)
consumer = SimpleConsumer(
    ClientConfiguration(endpoint, Credentials()), group, {topic: FilterExpression()}, await_duration=2
)
consumer.startup()
out = {"first": [], "attempts": []}
try:
    deadline = time.time() + 60
    while len(out["first"]) < count and time.time() < deadline:
        for m in consumer.receive(16, 2):
            body = m.body.decode()
            out["first"].append(body)
            out["attempts"].append(m.delivery_attempt)
            out.setdefault("keys", {})[body] = sorted(m.keys)
            out.setdefault("tags", {})[body] = m.tag
            if body != unacked:
                consumer.ack(m)
            else:
                out["unacked_at"] = time.time()
    while "again" not in out and time.time() < deadline:
        for m in consumer.receive(16, 5):
            if m.body.decode() == unacked:
                out["again"] = m.body.decode()
                out["again_attempt"] = m.delivery_attempt
                out["again_after_s"] = time.time() - out.pop("unacked_at")
                consumer.ack(m)
            else:
                out.setdefault("unexpected", []).append(m.body.decode())
finally:
    consumer.shutdown()
print(json.dumps(out), flush=True)
