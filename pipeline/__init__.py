"""Operator-facing backbone: config, CLI, stream registry, ingestors, Redis Streams transport, workers, metrics."""
