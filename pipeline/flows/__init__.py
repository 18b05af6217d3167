"""Workflows the driver runs: plan, launch the workers, commit once (run, update, compact, reindex, dry run)."""
