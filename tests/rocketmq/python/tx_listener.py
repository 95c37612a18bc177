"""An official RocketMQ 5 Python transactional producer that only answers
check-backs.

Usage: tx_listener.py ENDPOINT TOPIC SECONDS ACCESS_KEY SECRET_KEY

Publishes TOPIC with a TransactionChecker that commits what it is asked
about, for SECONDS; prints one JSON object with the keys of the messages
it was asked about.
"""

import json
import sys
import time

from rocketmq import (ClientConfiguration, Credentials, Producer,
                      TransactionChecker, TransactionResolution)

endpoint, topic, seconds, access_key, secret_key = sys.argv[1:6]
asked = []


class Checker(TransactionChecker):
    def check(self, message):
        asked.append(sorted(message.keys))
        return TransactionResolution.COMMIT


config = ClientConfiguration(endpoint, Credentials(access_key, secret_key))
producer = Producer(config, (topic,), Checker())
producer.startup()
try:
    time.sleep(float(seconds))
finally:
    producer.shutdown()
print(json.dumps({"asked": asked}), flush=True)
