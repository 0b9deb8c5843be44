"""Operating the daemon: metrics, trace context, control requests and `swarm status`,
returning memory to the OS, and shared reads for bursts of requests."""
