// BullMQ's drain of N no-op jobs with 200-byte payloads by one worker of concurrency 8, the
// shape of fleetq-bench's end-to-end figure: jobs added first with `addBulk` (1 000 a call),
// then the worker started; the clock runs until every job completed. Prints one JSON line
// with jobs/s, Redis CPU per job (INFO cpu, user + sys, over the drain) and Redis commands
// per job (INFO commandstats, whole lifecycle).
//
// Needs a redis-server of its own (pass its port; the script resets its INFO counters) and
// BullMQ, installed outside the repo:
//
//   mkdir /tmp/bullmq && cd /tmp/bullmq && npm init -y && npm install bullmq@6.7.6
//   redis-server --port 6420 --save '' &
//   NODE_PATH=/tmp/bullmq/node_modules node bench/scripts/bullmq_drain.mjs 6420 50000
//
// Compare with fleetq-bench's "end to end" row run on the same machine right before or after
// (its own redis-server, same Redis version): the machine is shared, so only ratios from one
// sitting mean anything.
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.env.NODE_PATH || 'node_modules', '..', 'package.json'));
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

const port = Number(process.argv[2] || 6379);
const n = Number(process.argv[3] || 20000);
const connection = { host: '127.0.0.1', port, maxRetriesPerRequest: null };
const admin = new IORedis(connection);

async function info(section) {
  const text = await admin.info(section);
  const out = {};
  for (const line of text.split('\r\n')) {
    const [k, v] = line.split(':');
    if (v !== undefined) out[k] = v;
  }
  return out;
}
const cpu = async () => {
  const i = await info('cpu');
  return Number(i.used_cpu_user) + Number(i.used_cpu_sys);
};
const calls = async () => {
  const i = await info('commandstats');
  let total = 0;
  for (const [k, v] of Object.entries(i)) {
    if (!k.startsWith('cmdstat_') || k === 'cmdstat_info' || k === 'cmdstat_config|resetstat') continue;
    total += Number(/calls=(\d+)/.exec(v)[1]);
  }
  return total;
};

// The server's counters start from here (its data is left alone: the queue's name is new).
await admin.config('RESETSTAT');
const name = `drain-${Date.now()}`;
const queue = new Queue(name, { connection });
const payload = { x: 'a'.repeat(180) };
for (let i = 0; i < n; i += 1000) {
  const jobs = [];
  for (let j = i; j < Math.min(n, i + 1000); j++) {
    jobs.push({ name: 'noop', data: payload, opts: { removeOnComplete: true } });
  }
  await queue.addBulk(jobs);
}
let done = 0;
let finish;
const finished = new Promise((resolve) => { finish = resolve; });
const cpu0 = await cpu();
const t0 = process.hrtime.bigint();
const worker = new Worker(name, async () => ({}), { connection, concurrency: 8 });
worker.on('completed', () => {
  done += 1;
  if (done === n) finish();
});
await finished;
const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
const cpu1 = await cpu();
const commands = await calls();
await worker.close();
await queue.close();
await admin.quit();
console.log(JSON.stringify({
  bullmq: '6.7.6',
  jobs: n,
  seconds: Number(seconds.toFixed(3)),
  jobs_per_sec: Math.round(n / seconds),
  redis_cpu_us_per_job: Number((((cpu1 - cpu0) * 1e6) / n).toFixed(1)),
  server_cmds_per_job: Number((commands / n).toFixed(2)),
}));
