"""Pure compute cores of the built-in workloads (MLP training, model store, table aggregation)."""
