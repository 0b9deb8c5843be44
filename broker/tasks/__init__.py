"""From a delivery to its outcome: intake (decode and validate), duplicates and tasks in
progress, the run with its retries, cancels and leases, the outcome and the reply it makes,
and how a delivery is settled. No AMQP, no Ray."""
