"""In-memory stand-ins for RabbitMQ and Ray, under the daemon's real receive path.

- `sync`: `Changes` (wait for a predicate over the fakes, no polling) and `FakeClock`.
- `server`: `MemoryBroker`, RabbitMQ in memory beneath the real AmqpSession, Publisher and
  Ingress (queues, confirms, returns, nacks, held publishes, dropped connections).
- `amqp`: the client objects it hands out (connections, channels, deliveries).
- `pools`: `FakePools`, PoolSet's surface on the real ledger, each run answered by the test.
- `ray`: `FakeRay`, what PoolSet itself calls of Ray (nodes, actor pools, the autoscaler's
  node types and requests), for testing PoolSet.
- `swarm`: `RecordingSettlement` and `delivery()` (the Delivery/Settlement seam),
  `MemoryOutcomeStore`, and `MemorySwarm`, one daemon's ingress, processors, scheduler and
  ledger wired together on the two fakes above.
"""
