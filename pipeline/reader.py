"""Public name kept for one release: the reader lives in `pipeline.serve.state_reader`."""
from pipeline.serve.state_reader import *  # noqa: F401,F403
from pipeline.serve.state_reader import EncodedPassage, PassageStates, StateReader  # noqa: F401
