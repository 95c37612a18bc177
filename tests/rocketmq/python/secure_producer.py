"""The official RocketMQ 5 Python producer over TLS, with access keys.

Usage: secure_producer.py ENDPOINT TOPIC CA_FILE [ACCESS_KEY SECRET_KEY]

Connects with TLS, trusting the certificates CA_FILE signed (gRPC reads
GRPC_DEFAULT_SSL_ROOTS_FILE_PATH), signs its calls with the access key
when one is given, and sends one message to TOPIC. Prints one JSON object
with the message id, or with the error the send raised.
"""

import json
import os
import sys

endpoint, topic, ca = sys.argv[1:4]
access_key, secret_key = (sys.argv[4:6] + ["", ""])[:2]
os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = ca

from rocketmq import ClientConfiguration, Credentials, Message, Producer  # noqa: E402

config = ClientConfiguration(endpoint, Credentials(access_key, secret_key))
producer = Producer(config, (topic,), tls_enable=True)
out = {}
try:
    producer.startup()
    m = Message()
    m.topic = topic
    m.body = b"over-tls"
    m.keys = "k-tls"
    out["id"] = producer.send(m).message_id
except Exception as e:  # the test reads what was refused
    out["error"] = str(e)
finally:
    try:
        producer.shutdown()
    except Exception:
        pass
print(json.dumps(out), flush=True)
