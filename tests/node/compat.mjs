// Reads cogrelay's queue with BullMQ for Node, and adds a job for cogrelay to deliver.
//   node compat.mjs <redis port> <queue name> <failed job id>
// Prints one JSON object: the job counts, the failed job as BullMQ sees it, the
// added job's id, the "completed" event BullMQ's QueueEvents saw for it once
// cogrelay delivered it, and that job as BullMQ reads it then.
import { Queue, QueueEvents } from 'bullmq';

const [, , port, queueName, failedId] = process.argv;
const connection = { host: '127.0.0.1', port: Number(port) };
const queue = new Queue(queueName, { connection });
const events = new QueueEvents(queueName, { connection });
await events.waitUntilReady();
const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
const failed = await queue.getJob(failedId);
const logs = await queue.getJobLogs(failedId);
const seen = [];
events.on('completed', (e) => seen.push(e));
const added = await queue.add('deliver-event', {
  eventKey: 'cognigy-node-bot-node-1',
  eventId: 'node-1',
  botId: 'node-bot',
  type: 'message.received',
  kind: 'event',
  body: JSON.stringify({ from: 'bullmq for node' }),
});
const deadline = Date.now() + 15000;
while (!seen.some((e) => e.jobId === added.id) && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 50));
}
const done = await queue.getJob(added.id);
console.log(JSON.stringify({
  counts,
  failed: failed && {
    name: failed.name,
    data: failed.data,
    failedReason: failed.failedReason,
    attemptsMade: failed.attemptsMade,
    logs: logs.logs,
  },
  added: added.id,
  completedEvent: seen.find((e) => e.jobId === added.id) ?? null,
  addedJob: done && {
    state: await done.getState(),
    attemptsMade: done.attemptsMade,
    finishedOn: done.finishedOn ?? null,
    returnvalue: done.returnvalue ?? null,
  },
}));
await events.close();
await queue.close();
