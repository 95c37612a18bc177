"""The official RocketMQ 5 Python push consumer against txmq's gRPC API.

Usage: push_consumer.py ENDPOINT TOPIC GROUP COUNT

Consumes TOPIC until COUNT messages arrived; prints their bodies as JSON.
"""

import json
import sys
import threading
import time

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression,
                      MessageListener, PushConsumer)

endpoint, topic, group, count = sys.argv[1:5]
count = int(count)
bodies = []
lock = threading.Lock()
done = threading.Event()


class Listener(MessageListener):
    def consume(self, message):
        with lock:
            bodies.append(message.body.decode())
            if len(bodies) >= count:
                done.set()
        return ConsumeResult.SUCCESS


consumer = PushConsumer(
    ClientConfiguration(endpoint, Credentials()), group, Listener(), {topic: FilterExpression()}
)
consumer.startup()
try:
    done.wait(60)
    # Acks go out after consume() returns.
    time.sleep(0.5)
finally:
    consumer.shutdown()
with lock:
    print(json.dumps({"bodies": bodies}), flush=True)
