"""Public name kept for one release: the decoupled reader lives in `pipeline.serve.qa_reader`."""
from pipeline.serve.qa_reader import *  # noqa: F401,F403
from pipeline.serve.qa_reader import DecoupledReader  # noqa: F401
