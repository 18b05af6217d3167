"""`python -m jobs.cli`: the same as the `precompute` console script."""
from jobs.cli import entry

entry()
