// amqplib against Holdfast: how connections end.
//
//   node close.js HOST PORT burst    2,000 sendToQueue calls, then connection.close():
//                                    close-ok must arrive and no socket error follow
//                                    (amqplib's close overtakes its buffered publishes).
//   node close.js HOST PORT publish  publishes until the broker closes the connection,
//                                    then prints the reply code it was closed with.
'use strict';
const amqp = require('amqplib');

const [host, port, mode] = process.argv.slice(2);
const url = `amqp://guest:guest@${host}:${port}`;
const errors = [];

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function burst() {
  const connection = await amqp.connect(url);
  connection.on('error', (err) => errors.push(`connection error: ${err.message}`));
  const channel = await connection.createChannel();
  channel.on('error', (err) => errors.push(`channel error: ${err.message}`));
  await channel.assertQueue('node-burst', { durable: false });
  for (let i = 0; i < 2000; i++) {
    channel.sendToQueue('node-burst', Buffer.from(`message ${i}`));
  }
  await connection.close();
  // A reset after close-ok surfaces as a late socket error.
  await sleep(500);
  if (errors.length > 0) {
    throw new Error(errors.join('; '));
  }
  console.log('burst: closed cleanly');
}

async function publishUntilClosed() {
  const connection = await amqp.connect(url);
  const closed = new Promise((resolve) => {
    connection.on('close', (err) => resolve(err));
  });
  connection.on('error', (err) => errors.push(err));
  const channel = await connection.createChannel();
  channel.on('error', () => {});
  await channel.assertQueue('node-publish', { durable: false, arguments: { 'x-max-length': 1000 } });
  let open = true;
  closed.then(() => {
    open = false;
  });
  console.log('publishing');
  while (open) {
    try {
      channel.sendToQueue('node-publish', Buffer.alloc(256));
    } catch (err) {
      break;
    }
    await new Promise((resolve) => setImmediate(resolve));
  }
  const err = await closed;
  const code = err && err.code;
  console.log(`closed by the broker: ${code} ${err && err.message}`);
}

// An AMQP operation whose reply never comes leaves node with nothing to do: it would
// exit 0 in silence. That is a failure (e.g. a close-ok destroyed by a reset).
process.on('beforeExit', () => {
  console.error(`FAILED: ${mode}: the broker's reply never arrived; ${errors.join('; ')}`);
  process.exit(1);
});

const run = mode === 'burst' ? burst : publishUntilClosed;
run().then(
  () => process.exit(0),
  (err) => {
    console.error(`FAILED: ${err && err.stack ? err.stack : err}`);
    process.exit(1);
  },
);
