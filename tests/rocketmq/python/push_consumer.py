"""The official RocketMQ 5 Python push consumer against txmq's gRPC API.

Usage: push_consumer.py ENDPOINT TOPIC GROUP COUNT [FAIL]

Consumes TOPIC until COUNT messages arrived; prints their bodies as JSON.
With FAIL, the listener fails the first delivery of the message whose
body is FAIL (the client then asks for it again after its retry backoff)
and the output also says how long after that it came again
("fail_again_after_s") with which delivery attempt.
"""

import json
import sys
import threading
import time

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression,
                      MessageListener, PushConsumer)

endpoint, topic, group, count = sys.argv[1:5]
fail = sys.argv[5] if len(sys.argv) > 5 else None
count = int(count)
bodies = []
out = {}
failed_at = None
lock = threading.Lock()
done = threading.Event()


class Listener(MessageListener):
    def consume(self, message):
        global failed_at
        body = message.body.decode()
        with lock:
            if body == fail and failed_at is None:
                failed_at = time.time()
                return ConsumeResult.FAILURE
            if body == fail:
                out["fail_again_after_s"] = time.time() - failed_at
                out["fail_again_attempt"] = message.delivery_attempt
            bodies.append(body)
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
    out["bodies"] = bodies
    print(json.dumps(out), flush=True)
