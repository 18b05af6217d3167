"""What runs on the Ray workers: the Ray Data flow, the per-split steps, ingest, the shard sink, the update scan."""
