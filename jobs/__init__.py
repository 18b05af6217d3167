"""Thin entry points: parse arguments or a job config, call the pipeline, report."""
