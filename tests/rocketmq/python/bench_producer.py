"""Send throughput of the official RocketMQ 5 Python producer.

Usage: bench_producer.py ENDPOINT TOPIC THREADS SECONDS SIZE

THREADS threads share one producer, each with one send in flight; prints
the messages per second counted over SECONDS after a 2 s warm-up.
"""

import json
import sys
import threading
import time

from rocketmq import ClientConfiguration, Credentials, Message, Producer

endpoint, topic, threads, seconds, size = sys.argv[1:6]
threads, seconds, size = int(threads), float(seconds), int(size)
producer = Producer(ClientConfiguration(endpoint, Credentials()), (topic,))
producer.startup()
body = b"x" * size
counting = threading.Event()
stop = threading.Event()
counts = [0] * threads


def sender(i):
    while not stop.is_set():
        m = Message()
        m.topic = topic
        m.body = body
        producer.send(m)
        if counting.is_set():
            counts[i] += 1


workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
time.sleep(2)
counting.set()
started = time.time()
time.sleep(seconds)
counting.clear()
elapsed = time.time() - started
stop.set()
for w in workers:
    w.join()
producer.shutdown()
print(json.dumps({"threads": threads, "size": size, "msg_per_s": sum(counts) / elapsed}), flush=True)
