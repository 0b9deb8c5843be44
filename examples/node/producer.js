#!/usr/bin/env node
// A Swarm producer in Node.js: publishes msgpack tasks to RabbitMQ and awaits their replies.
//
// Everything here follows the wire contract (PROTOCOL.md, "Swarm wire contract, version 1"):
// tasks go to the direct exchange `swarm.tasks` with routing key = task type, the body is one
// msgpack map, and the daemon answers on our `reply_to` queue with the same `correlation_id`.
//
//   AMQP_URL=amqp://guest:guest@localhost:5672/ node producer.js [--count N] [--timeout-s S]
//
// It prints one JSON line per reply on stdout and exits 0 when every reply came back as
// expected (the `fail` task is meant to fail, with error code `handler_error`).

import { randomUUID } from "node:crypto";
import { once } from "node:events";
import { isDeepStrictEqual, parseArgs } from "node:util";

import { decode, encode } from "@msgpack/msgpack";
import amqp from "amqplib";

const TASKS_EXCHANGE = "swarm.tasks";

/**
 * A small client: one connection, one confirm channel, one exclusive reply queue, and a map
 * of in-flight requests keyed by correlation id. Copy it into your service as it is.
 */
class SwarmProducer {
  #connection;
  #channel;
  #replyQueue;
  #pending = new Map(); // correlation id -> { resolve, reject, timer }

  constructor({ replyTimeoutMs = 60_000 } = {}) {
    this.replyTimeoutMs = replyTimeoutMs;
  }

  /** Connect, declare what a producer needs, and start consuming replies. */
  static async connect(url, options = {}) {
    const producer = new SwarmProducer(options);
    try {
      await producer.#open(url);
    } catch (err) {
      await producer.close().catch(() => {}); // don't leave a half-open connection behind
      throw err;
    }
    return producer;
  }

  async #open(url) {
    this.#connection = await amqp.connect(url, {
      timeout: 10_000, // socket connect timeout, in ms
      clientProperties: { connection_name: "swarm-node-producer" }, // shown in the management UI
    });
    // Without an "error" listener an unexpected close would crash the process; fail the
    // requests still waiting instead, so the caller sees why.
    this.#connection.on("error", (err) => this.#failAll(err));
    this.#connection.on("close", () => this.#failAll(new Error("connection closed")));

    // A confirm channel: RabbitMQ acks each publish once it has taken responsibility for it
    // (https://www.rabbitmq.com/docs/confirms#publisher-confirms).
    this.#channel = await this.#connection.createConfirmChannel();
    this.#channel.on("error", (err) => this.#failAll(err));
    // `mandatory` publishes that no queue accepts come back here (before their confirm):
    // usually the daemon has not declared its queues yet.
    this.#channel.on("return", (message) => {
      const { correlationId, messageId } = message.properties;
      const { routingKey } = message.fields;
      const error = new Error(
        `task ${messageId} unroutable: no queue is bound for '${routingKey}'` +
          " (is the Swarm daemon running?)",
      );
      this.#settle(correlationId, null, error);
    });

    // The contract allows producers to declare the exchange, with the daemon's arguments.
    // The queues are left to the daemon: their arguments (quorum, delivery limit) are its own.
    await this.#channel.assertExchange(TASKS_EXCHANGE, "direct", { durable: true });

    // An exclusive, server-named queue for our replies: it lives as long as this connection.
    const { queue } = await this.#channel.assertQueue("", { exclusive: true, autoDelete: true });
    this.#replyQueue = queue;
    // noAck: the queue is ours alone and dies with us, so acking replies would buy nothing.
    await this.#channel.consume(queue, (message) => this.#onReply(message), { noAck: true });
  }

  /**
   * Publish one task and resolve with its decoded reply (a plain object: msgpack maps decode
   * to objects). Rejects when the publish is refused, unroutable, or no reply comes in time.
   */
  async submit({ id = `node-${randomUUID()}`, type, handler, args, ...options }) {
    // One correlation id per request: a resend of the same task id gets its own.
    const correlationId = randomUUID();
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const error = new Error(`no reply for task ${id} within ${this.replyTimeoutMs / 1000}s`);
        this.#settle(correlationId, null, error);
      }, this.replyTimeoutMs);
      this.#pending.set(correlationId, { resolve, reject, timer });
    });
    // The reply may fail (returned, refused) before the caller awaits it; mark it handled
    // so Node does not report an unhandled rejection. The caller still sees the error.
    reply.catch(() => {});

    // Optional keys (resources, pool, priority, deadline, timeout_s, max_retries) pass through.
    const body = encode({ v: 1, id, type, handler, args, ...options });
    let writable = true;
    const confirmed = new Promise((resolve, reject) => {
      writable = this.#channel.publish(
        TASKS_EXCHANGE,
        type, // routing key = task type
        Buffer.from(body.buffer, body.byteOffset, body.byteLength),
        {
          contentType: "application/msgpack",
          persistent: true, // delivery_mode 2: survives a broker restart
          mandatory: true,
          messageId: id,
          correlationId,
          replyTo: this.#replyQueue,
        },
        (err) => (err ? reject(new Error(`RabbitMQ refused task ${id}`)) : resolve()),
      );
    });
    try {
      // `false` means the socket buffer is full: wait for "drain" before publishing more.
      if (!writable) await once(this.#channel, "drain");
      await confirmed;
    } catch (err) {
      this.#settle(correlationId, null, err);
    }
    return reply;
  }

  #onReply(message) {
    if (message === null) return; // the consumer was cancelled by the server
    const { correlationId } = message.properties;
    // Unknown correlation ids are ignored: the contract allows the same reply twice.
    if (!this.#pending.has(correlationId)) return;
    try {
      this.#settle(correlationId, decode(message.content));
    } catch (err) {
      this.#settle(correlationId, null, new Error(`unreadable reply: ${err.message}`));
    }
  }

  #settle(correlationId, reply, err = null) {
    const request = this.#pending.get(correlationId);
    if (request === undefined) return;
    this.#pending.delete(correlationId);
    clearTimeout(request.timer);
    if (err) request.reject(err);
    else request.resolve(reply);
  }

  #failAll(err) {
    for (const correlationId of [...this.#pending.keys()]) this.#settle(correlationId, null, err);
  }

  async close() {
    this.#failAll(new Error("producer closed"));
    // Closing the connection closes its channels; the reply queue goes with it.
    await this.#connection?.close();
  }
}

/** The URL without its password, for messages. */
function redact(url) {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "<AMQP_URL>";
  }
}

/** An error's text with any trace of the password removed. */
function safeMessage(err, url) {
  let text = String(err?.message ?? err);
  try {
    const password = decodeURIComponent(new URL(url).password);
    if (password) text = text.replaceAll(password, "***");
  } catch {
    // not a URL: nothing to redact
  }
  return text;
}

// JSON.stringify cannot print binary (msgpack bin) or bigints (int64); show them readably.
function jsonValue(_key, value) {
  if (value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  if (typeof value === "bigint") return value.toString();
  return value;
}

function parseOptions() {
  const { values } = parseArgs({
    options: {
      count: { type: "string", default: "0" },
      "timeout-s": { type: "string", default: "60" },
    },
  });
  const count = Number(values.count);
  const timeoutS = Number(values["timeout-s"]);
  if (!Number.isInteger(count) || count < 0) {
    throw new Error(`--count must be a whole number >= 0, got '${values.count}'`);
  }
  if (!(timeoutS > 0)) {
    throw new Error(`--timeout-s must be a number > 0, got '${values["timeout-s"]}'`);
  }
  return { count, timeoutS };
}

/** Why `reply` is not what `task` expects, or null when it is. */
function check(task, reply) {
  if (task.expect === "ok") {
    if (reply.status !== "ok") return `expected ok, got ${reply.error?.code ?? reply.status}`;
    if (!isDeepStrictEqual(reply.result, task.args)) return "result differs from args";
    return null;
  }
  if (reply.status === "error" && reply.error?.code === task.expect) return null;
  return `expected error ${task.expect}, got ${reply.error?.code ?? reply.status}`;
}

async function main() {
  let options;
  try {
    options = parseOptions();
  } catch (err) {
    console.error(`producer: ${err.message}`);
    return 2;
  }
  const url = process.env.AMQP_URL ?? "amqp://guest:guest@localhost:5672/";

  // One task of each type, one that fails on purpose, then --count extra echoes.
  // `echo` and `sleep` return their args, so "ok" here means: status ok, result == args.
  const tasks = [
    { type: "inference", handler: "echo", args: { x: 1 }, expect: "ok" },
    { type: "training", handler: "sleep", args: { seconds: 0.2 }, expect: "ok" },
    { type: "data_processing", handler: "echo", args: { rows: [1, 2, 3] }, expect: "ok" },
    {
      type: "inference",
      handler: "fail",
      args: { message: "on purpose" },
      expect: "handler_error",
    },
  ];
  for (let n = 0; n < options.count; n++) {
    tasks.push({ type: "inference", handler: "echo", args: { n }, expect: "ok" });
  }

  let producer;
  try {
    producer = await SwarmProducer.connect(url, { replyTimeoutMs: options.timeoutS * 1000 });
  } catch (err) {
    console.error(`producer: cannot connect to ${redact(url)}: ${safeMessage(err, url)}`);
    return 1;
  }

  const problems = [];
  try {
    // Pipelined: every task is published before any reply is awaited.
    const outcomes = await Promise.allSettled(
      tasks.map(async (task) => {
        const id = `node-${randomUUID()}`;
        const { type, handler, args } = task;
        const reply = await producer.submit({ id, type, handler, args });
        const line = {
          id: reply.id ?? id,
          type,
          handler,
          status: reply.status,
          result: reply.result ?? null,
          error: reply.error ?? null,
        };
        console.log(JSON.stringify(line, jsonValue));
        const problem = check(task, reply);
        if (problem) problems.push(`task ${id} (${type}/${handler}): ${problem}`);
      }),
    );
    for (const outcome of outcomes) {
      if (outcome.status === "rejected") problems.push(safeMessage(outcome.reason, url));
    }
  } finally {
    await producer.close().catch(() => {}); // already closed if the broker went away
  }

  for (const problem of problems) console.error(`producer: ${problem}`);
  if (problems.length > 0) {
    console.error(`producer: ${problems.length} of ${tasks.length} tasks did not end as expected`);
    return 1;
  }
  return 0;
}

// Set the exit code rather than calling process.exit(), so stdout is flushed first.
process.exitCode = await main();
