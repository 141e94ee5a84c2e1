#!/usr/bin/env node
// Put a job on a fleetq queue with a plain XADD, then wait for its result without polling.
//
// Needs only ioredis (npm install). Follows docs/protocol.md:
//
//     node producer.js --queue images --payload '{"prompt": "a red fox"}' [--timeout 30]
//
// REDIS_URL selects the server (default redis://127.0.0.1:6379). Prints one JSON object
// (id, state, result or error) and exits 0 when the job succeeded, 1 when it ended otherwise,
// 2 when the wait timed out, 3 on bad arguments. A Redis error (server unreachable, library
// not loaded) is reported on stderr with exit code 1 and nothing on stdout.
//
// --timeout is in seconds and may be fractional; 0 waits forever (as BLPOP does).

import { parseArgs } from "node:util";
import Redis from "ioredis";

const TERMINAL = new Set(["succeeded", "failed", "dead", "expired", "cancelled", "not_found"]);

// Queue names are 1 to 100 bytes of ASCII letters, digits, '-', '_' and '.' (protocol §1).
const QUEUE_NAME = /^[A-Za-z0-9._-]{1,100}$/;

const USAGE =
  "usage: node producer.js --queue QUEUE --payload JSON [--timeout SECONDS]\n" +
  "  REDIS_URL selects the server (default redis://127.0.0.1:6379)";

const streamKey = (queue) => `fleetq:{${queue}}:stream`;
const notifyKey = (queue, jobId) => `fleetq:{${queue}}:notify:${jobId}`;

class UsageError extends Error {}

function parseCommandLine(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        queue: { type: "string" },
        payload: { type: "string" },
        timeout: { type: "string", default: "30" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    throw new UsageError(e.message);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (values.queue === undefined) throw new UsageError("--queue is required");
  if (!QUEUE_NAME.test(values.queue)) {
    throw new UsageError(
      `--queue ${JSON.stringify(values.queue)} is not a valid queue name: ` +
        "use 1 to 100 ASCII letters, digits, '-', '_' or '.'",
    );
  }
  if (values.payload === undefined) throw new UsageError("--payload is required");
  try {
    JSON.parse(values.payload);
  } catch (e) {
    throw new UsageError(
      `--payload is not valid JSON (${e.message}); pass e.g. '{"prompt": "a red fox"}'`,
    );
  }
  const timeout = Number(values.timeout);
  if (values.timeout.trim() === "" || !Number.isFinite(timeout) || timeout < 0) {
    throw new UsageError(
      `--timeout must be a number of seconds >= 0, got ${JSON.stringify(values.timeout)}`,
    );
  }
  return { queue: values.queue, payload: values.payload, timeout };
}

// A flat [field, value, field, value, …] reply as an object.
function asObject(flat) {
  const out = {};
  for (let i = 0; i + 1 < flat.length; i += 2) out[String(flat[i])] = String(flat[i + 1]);
  return out;
}

// A plain XADD: the entry id is the job id. The payload goes out exactly as given
// (it has been checked to be JSON), so large integers and key order are kept.
async function enqueue(redis, queue, payloadJson) {
  return redis.xadd(streamKey(queue), "*", "payload", payloadJson);
}

// fleetq_status, or fleetq_watch, which also registers this caller as a waiter.
async function status(redis, queue, jobId, watch = false) {
  const name = watch ? "fleetq_watch" : "fleetq_status";
  return asObject(await redis.call("FCALL", name, 1, streamKey(queue), jobId));
}

// Blocks on BLPOP of the job's notify key until the job ends (or the timeout passes).
// Returns null on timeout. BLPOP holds its connection, so it gets a connection of its own.
async function wait(redis, queue, jobId, timeout) {
  const st = await status(redis, queue, jobId, true);
  if (TERMINAL.has(st.state)) return st;
  const blocker = redis.duplicate();
  blocker.on("error", () => {}); // reported through the rejected command
  try {
    if ((await blocker.blpop(notifyKey(queue, jobId), timeout)) === null) return null;
  } finally {
    blocker.disconnect();
  }
  return status(redis, queue, jobId);
}

// The result is JSON text already. It is copied as it is rather than through JSON.parse and
// JSON.stringify, which would round integers above 2^53 (fleetq keeps them exact). Line
// breaks are dropped so the output stays one line: in valid JSON they can only be whitespace
// between tokens. A result that is not JSON (not written by fleetq) is passed on as a string.
function resultJson(text) {
  try {
    JSON.parse(text);
  } catch {
    return JSON.stringify(text);
  }
  return text.replace(/[\r\n]/g, "");
}

// Seconds as Python's str(float) writes them, so the message matches producer.py.
const seconds = (t) => (Number.isInteger(t) ? t.toFixed(1) : String(t));

async function main() {
  let args;
  try {
    args = parseCommandLine(process.argv.slice(2));
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`${e.message}\n${USAGE}`);
    return 3;
  }
  const url = process.env.REDIS_URL || "redis://127.0.0.1:6379";
  // Fail at once when the server cannot be reached instead of reconnecting forever.
  const redis = new Redis(url, { retryStrategy: () => null, maxRetriesPerRequest: 0 });
  redis.on("error", () => {}); // reported through the rejected command
  try {
    const jobId = await enqueue(redis, args.queue, args.payload);
    const st = await wait(redis, args.queue, jobId, args.timeout);
    if (st === null) {
      const error = `job ${jobId} did not end within ${seconds(args.timeout)} s`;
      console.log(JSON.stringify({ id: jobId, state: "timeout", error }));
      return 2;
    }
    let line = `{"id":${JSON.stringify(jobId)},"state":${JSON.stringify(st.state)}`;
    if ("result" in st) line += `,"result":${resultJson(st.result)}`;
    if ("error" in st) line += `,"error":${JSON.stringify(st.error)}`;
    console.log(`${line}}`);
    return st.state === "succeeded" ? 0 : 1;
  } catch (e) {
    console.error(`fleetq producer: Redis error at ${redactUrl(url)}: ${e.message}`);
    return 1;
  } finally {
    redis.disconnect();
  }
}

// The URL without its password, for messages.
function redactUrl(url) {
  try {
    const u = new URL(url);
    if (u.password) u.password = "***";
    return u.toString();
  } catch {
    return "(REDIS_URL)";
  }
}

// exitCode rather than process.exit(), so that stdout is flushed when it is a pipe.
process.exitCode = await main();
