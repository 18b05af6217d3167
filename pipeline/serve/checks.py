"""A question and its k, checked once: the CLI and Python callers of the reader and the searcher get the
same one-line usage error (exit 2), not a bare ValueError. No torch here, so the CLI can check first."""
from __future__ import annotations

import operator

from pipeline.schema import ConfigError, check_device  # noqa: F401  (the device check lives in pipeline.schema)

MAX_QUESTION_CHARS = 10_000
MAX_K = 100             # `answer`: the upper layers run on all k sequences as one batch
MAX_SEARCH_K = 10_000   # `search`: ids and titles only


def check_question(question) -> str:
    """The question, stripped; empty or over MAX_QUESTION_CHARS is refused."""
    if not isinstance(question, str) or not question.strip():
        raise ConfigError("empty question: pass the question text")
    question = question.strip()
    if len(question) > MAX_QUESTION_CHARS:
        raise ConfigError(f"the question is longer than {MAX_QUESTION_CHARS:,} characters")
    return question


def check_k(k, most: int = MAX_K) -> int:
    """k in 1..most; `answer` reads at most MAX_K passages in one batch, `search` returns up to MAX_SEARCH_K."""
    try:
        value = None if isinstance(k, bool) else operator.index(k)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= most:
        why = " (one batch of k sequences)" if most == MAX_K else ""
        raise ConfigError(f"k={k!r}: pass 1..{most} passages{why}")
    return value
