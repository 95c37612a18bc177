// The official RocketMQ 5 Node.js producer over TLS, with access keys.
//
// Usage: node secure_producer.js ENDPOINT TOPIC CA_FILE ACCESS_KEY SECRET_KEY
//
// Trusts the certificates CA_FILE signed (grpc-js reads
// GRPC_DEFAULT_SSL_ROOTS_FILE_PATH when it loads), signs its calls with the
// access key, and sends one message to TOPIC. Prints one JSON object with
// the message id.
'use strict';

const [endpoint, topic, ca, accessKey, accessSecret] = process.argv.slice(2);
process.env.GRPC_DEFAULT_SSL_ROOTS_FILE_PATH = ca;
const { Producer } = require('rocketmq-client-nodejs');

async function main() {
  const producer = new Producer({
    endpoints: endpoint,
    sslEnabled: true,
    sessionCredentials: { accessKey, accessSecret },
  });
  await producer.startup();
  try {
    const receipt = await producer.send({
      topic,
      tag: 'node',
      keys: ['k-node-tls'],
      body: Buffer.from('node-over-tls'),
    });
    console.log(JSON.stringify({ id: receipt.messageId }));
  } finally {
    await producer.shutdown();
  }
}

// The client's telemetry timers outlive its shutdown: exit once done.
main().then(() => process.exit(0), e => { console.error(e); process.exit(1); });
