// Reads cogrelay's queue with BullMQ for Node, and adds a job for cogrelay to deliver.
//   node compat.mjs <redis port> <queue name> <failed job id>
// Prints one JSON object: the job counts, the failed job as BullMQ sees it, the added job's id.
import { Queue } from 'bullmq';

const [, , port, queueName, failedId] = process.argv;
const queue = new Queue(queueName, { connection: { host: '127.0.0.1', port: Number(port) } });
const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
const failed = await queue.getJob(failedId);
const logs = await queue.getJobLogs(failedId);
const added = await queue.add('deliver-event', {
  eventKey: 'cognigy-node-bot-node-1',
  eventId: 'node-1',
  botId: 'node-bot',
  type: 'message.received',
  kind: 'event',
  body: JSON.stringify({ from: 'bullmq for node' }),
});
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
}));
await queue.close();
