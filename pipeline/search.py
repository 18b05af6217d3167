"""Public name kept for one release: the searcher lives in `pipeline.serve.searcher`."""
from pipeline.serve.searcher import *  # noqa: F401,F403
from pipeline.serve.searcher import Searcher  # noqa: F401
