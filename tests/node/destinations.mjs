// Reads two of cogrelay's destination queues with BullMQ for Node, and pauses
// one of them the BullMQ way.
//   node destinations.mjs <redis port> <queue of crm> <queue of warehouse>
// Prints one JSON object: each queue's counts and jobs as BullMQ sees them.
import { Queue } from 'bullmq';

const [, , port, crmName, warehouseName] = process.argv;
const connection = { host: '127.0.0.1', port: Number(port) };
const out = {};
for (const [key, name] of [['crm', crmName], ['warehouse', warehouseName]]) {
  const queue = new Queue(name, { connection });
  const counts = await queue.getJobCounts('waiting', 'waiting-children', 'active', 'delayed', 'completed', 'failed');
  const jobs = await queue.getJobs(['completed', 'failed']);
  out[key] = {
    counts,
    jobs: jobs.map((j) => ({ id: j.id, name: j.name, data: j.data, failedReason: j.failedReason ?? null })),
  };
  if (key === 'warehouse') {
    await queue.pause();
    out.warehousePaused = await queue.isPaused();
  }
  await queue.close();
}
console.log(JSON.stringify(out));
