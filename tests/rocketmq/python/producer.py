"""The official RocketMQ 5 Python producer against txmq's gRPC API.

Usage: producer.py ENDPOINT TOPIC TX_TOPIC [ACCESS_KEY SECRET_KEY]

Sends a normal message, three FIFO messages of one message group and a
delayed message to TOPIC; then, on TX_TOPIC, commits one transaction,
rolls one back, and leaves one open that its TransactionChecker answers
UNKNOWN at the first check-back and commits at the second. Prints one JSON object with the message ids.
"""

import json
import sys
import threading
import time

from rocketmq import (ClientConfiguration, Credentials, Message, Producer,
                      TransactionChecker, TransactionResolution)

endpoint, topic, tx_topic = sys.argv[1:4]
access_key, secret_key = (sys.argv[4:6] + ["", ""])[:2]
config = ClientConfiguration(endpoint, Credentials(access_key, secret_key))
checked = threading.Event()
asked = []


class Checker(TransactionChecker):
    def check(self, message):
        asked.append(message.keys)
        # Not known at the first check (this client's enum has no
        # UNKNOWN; it sends no resolution): the broker asks again.
        if len(asked) == 1:
            return TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED
        checked.set()
        return TransactionResolution.COMMIT


def message(topic, body, keys, tag="rmq"):
    m = Message()
    m.topic = topic
    m.body = body.encode()
    m.tag = tag
    m.keys = keys
    m.add_property("origin", "python")
    return m


out = {}
producer = Producer(config, (topic,))
producer.startup()
try:
    out["normal"] = producer.send(message(topic, "normal", "k-normal")).message_id
    fifo = []
    for i in range(3):
        m = message(topic, f"fifo-{i}", f"k-fifo-{i}")
        m.message_group = "group-1"
        fifo.append(producer.send(m).message_id)
    out["fifo"] = fifo
    delayed = message(topic, "delayed", "k-delayed")
    out["delay_until_ms"] = int(time.time() * 1000) + 8000
    delayed.delivery_timestamp = out["delay_until_ms"]
    out["delayed"] = producer.send(delayed).message_id
finally:
    producer.shutdown()

tx_producer = Producer(config, (tx_topic,), Checker())
tx_producer.startup()
try:
    t = tx_producer.begin_transaction()
    out["committed"] = tx_producer.send(message(tx_topic, "committed", "k-commit"), t).message_id
    t.commit()
    t = tx_producer.begin_transaction()
    out["rolled_back"] = tx_producer.send(message(tx_topic, "rolled-back", "k-rollback"), t).message_id
    t.rollback()
    t = tx_producer.begin_transaction()
    out["checked"] = tx_producer.send(message(tx_topic, "checked", "k-check"), t).message_id
    # Neither commit nor rollback: the broker checks back.
    if not checked.wait(60):
        raise SystemExit("the broker never checked back")
    # The checker's answer goes out as an EndTransaction after check().
    time.sleep(0.5)
    out["asked"] = [sorted(k) for k in asked]
finally:
    tx_producer.shutdown()
print(json.dumps(out), flush=True)
