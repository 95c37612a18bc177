"""An official RocketMQ 5 Python transactional producer that only answers
check-backs.

Usage: tx_listener.py ENDPOINT TOPIC SECONDS ACCESS_KEY SECRET_KEY

Publishes TOPIC with a TransactionChecker that commits what it is asked
about, until it is asked once or SECONDS have passed; prints one JSON
object with the keys of the messages it was asked about.
"""

import json
import sys
import threading
import time

from rocketmq import (ClientConfiguration, Credentials, Producer,
                      TransactionChecker, TransactionResolution)

endpoint, topic, seconds, access_key, secret_key = sys.argv[1:6]
asked = []
was_asked = threading.Event()


class Checker(TransactionChecker):
    def check(self, message):
        asked.append(sorted(message.keys))
        was_asked.set()
        return TransactionResolution.COMMIT


config = ClientConfiguration(endpoint, Credentials(access_key, secret_key))
producer = Producer(config, (topic,), Checker())
producer.startup()
try:
    if was_asked.wait(float(seconds)):
        # The checker's answer goes out as an EndTransaction after check().
        time.sleep(0.5)
finally:
    producer.shutdown()
print(json.dumps({"asked": asked}), flush=True)
