"""Where a task runs: placement rules, the scheduler's waiting lists, the ledger of what
the cluster has and what is used, and the pools of Ray actors."""
