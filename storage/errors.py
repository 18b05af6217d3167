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


def find_cause(exc: BaseException, types: tuple[type, ...], follow_context: bool = False,
               depth: int = 32) -> BaseException | None:
    """The exception of `types` behind `exc`: itself, a Ray task's `cause`, or one down the __cause__ chain
    (and the __context__ chain when asked: Ray Data re-raises a worker's error while handling its own)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and depth > 0:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        depth -= 1
        cause = getattr(e, "cause", None)  # Ray's RayTaskError: an instance of the cause's class, with a traceback
        if isinstance(cause, types):  # for a message; the cause carries the user's one
            return cause
        if isinstance(e, types):
            return e
        todo += [x for x in (cause, e.__cause__, e.__context__ if follow_context else None)
                 if isinstance(x, BaseException)]
    return None


def find_product_error(exc: BaseException) -> PrecomputeError | None:
    """For the CLI: explicit links only, so a bug raised while handling a product error keeps its traceback."""
    return find_cause(exc, (PrecomputeError,))


def one_line(exc: BaseException, limit: int = 2_000) -> str:
    """The message on one line, without terminal colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit] + " …"
