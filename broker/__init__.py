"""The Swarm broker daemon: AMQP in and out, the scheduler and the resource ledger."""
