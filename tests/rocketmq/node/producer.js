// The official RocketMQ 5 Node.js producer against txmq's gRPC API.
//
// Usage: node producer.js ENDPOINT TOPIC TX_TOPIC
//
// Sends a message to TOPIC; on TX_TOPIC commits one transaction and leaves
// one open that its TransactionChecker commits when the broker checks
// back. Prints one JSON object with the message ids.
'use strict';

const { Producer } = require('rocketmq-client-nodejs');
const { TransactionResolution } = require('rocketmq-client-nodejs/proto/apache/rocketmq/v2/definition_pb');

const [endpoint, topic, txTopic] = process.argv.slice(2);

async function main() {
  const out = {};
  const producer = new Producer({ endpoints: endpoint });
  await producer.startup();
  try {
    const receipt = await producer.send({
      topic,
      tag: 'node',
      keys: ['k-node'],
      properties: new Map([['origin', 'node']]),
      body: Buffer.from('from-node'),
    });
    out.normal = receipt.messageId;
  } finally {
    await producer.shutdown();
  }

  const asked = [];
  let checked;
  const wasChecked = new Promise(resolve => { checked = resolve; });
  const txProducer = new Producer({
    endpoints: endpoint,
    topics: [txTopic],
    checker: {
      async check(messageView) {
        asked.push(messageView.keys);
        checked();
        return TransactionResolution.COMMIT;
      },
    },
  });
  await txProducer.startup();
  try {
    let tx = txProducer.beginTransaction();
    out.committed = (await txProducer.send({
      topic: txTopic, tag: 'node', keys: ['k-node-commit'], body: Buffer.from('node-committed'),
    }, tx)).messageId;
    await tx.commit();
    tx = txProducer.beginTransaction();
    out.checked = (await txProducer.send({
      topic: txTopic, tag: 'node', keys: ['k-node-check'], body: Buffer.from('node-checked'),
    }, tx)).messageId;
    // Neither commit nor rollback: the broker checks back.
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('the broker never checked back')), 60000));
    await Promise.race([wasChecked, timeout]);
    // The checker's answer goes out as an EndTransaction after check().
    await new Promise(resolve => setTimeout(resolve, 500));
    out.asked = asked;
  } finally {
    await txProducer.shutdown();
  }
  console.log(JSON.stringify(out));
}

main().then(() => process.exit(0), e => { console.error(e); process.exit(1); });
