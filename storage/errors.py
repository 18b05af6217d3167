"""The product's errors: what a user can act on, each with the exit code the CLI returns for it.

The CLI catches `PrecomputeError` (also when a Ray worker raised it) and prints its message as one
line; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class PrecomputeError(Exception):
    """Base of every error a user can act on."""
    exit_code = 1


class UsageError(PrecomputeError):
    """Bad input or settings: the command line, the corpus, the model or the store must change."""
    exit_code = 2


class OperationFailed(PrecomputeError):
    """The inputs were fine but the work could not complete (a conflict, damaged files, a missing version)."""
    exit_code = 1


def find_product_error(exc: BaseException, depth: int = 12) -> PrecomputeError | None:
    """The PrecomputeError behind `exc`: itself, a Ray task's cause, or one down the __cause__ chain."""
    seen: set[int] = set()
    todo = [exc]
    while todo and depth > 0:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        depth -= 1
        cause = getattr(e, "cause", None)  # Ray's RayTaskError: an instance of the cause's class, with a traceback
        if isinstance(cause, PrecomputeError):  # for a message; the cause carries the user's one
            return cause
        if isinstance(e, PrecomputeError):
            return e
        # explicit links only: a bug raised while handling a product error (__context__) keeps its traceback
        todo += [x for x in (cause, e.__cause__) if isinstance(x, BaseException)]
    return None


def one_line(exc: BaseException, limit: int = 2_000) -> str:
    """The message on one line, without terminal colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit] + " …"
