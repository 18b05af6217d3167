"""Where bytes live: fsspec access, Parquet shards, manifest versions, and the pure storage model."""
