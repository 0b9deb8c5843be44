"""AMQP in and out: connections and sessions, the topology, consuming (the ingress),
publishing outcomes and dead letters, the hot path's own framing, tolerant frame decoding,
and the outcome store, which lives on a RabbitMQ stream. The only place aio-pika is imported."""
