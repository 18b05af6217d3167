"""The product's errors: what a user can act on, each with the exit code the CLI returns for it.

The CLI catches `PrecomputeError` (also when a Ray worker raised it) and prints its message as one
line; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import errno
import re
from urllib.parse import urlsplit, urlunsplit


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
    """For the CLI: explicit links only, so a bug raised while handling a product error keeps its traceback.

    A backend's "cannot reach", "access denied" or "slow down" that no location named on its way out (a read
    inside a stream, a worker's own request) still becomes one line: the user can act on it, a traceback
    would not help them."""
    return find_cause(exc, (PrecomputeError,)) or unnamed_backend_error(exc)


# Where a user sets each location's fsspec options (the job files' keys are the same names: see README).
OPTION_FLAGS = {"store": "--storage-options", "corpus": "--corpus-storage-options",
                "compressor": "--compressor-storage-options"}

# How the backends say it, by class name (botocore, aiohttp, the socket layer): storage imports none of them.
_UNREACHABLE_TYPES = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                                "ProxyConnectionError", "ClientConnectorError", "ConnectionRefusedError", "gaierror"})
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
_THROTTLED_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                              "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable", "503", "429"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "AccountProblem"})


def _kind_of(exc: BaseException) -> str | None:
    """'unreachable', 'throttled' or 'denied' for one exception as a backend raised it, else None."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _UNREACHABLE_TYPES or (isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS):
        return "unreachable"
    response = getattr(exc, "response", None)  # botocore's ClientError: the service's own error code
    code, status = None, getattr(exc, "code", None) if "HttpError" in names else None  # gcsfs: the HTTP status
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in _THROTTLED_CODES or status in (429, 503):
        return "throttled"
    if code in _DENIED_CODES or status == 403:
        return "denied"
    return None


def backend_failure(exc: BaseException) -> tuple[str, BaseException] | None:
    """(kind, the exception that says so) when a storage backend could not be reached, kept throttling past its
    retries, or denied access: `exc` itself or one of its explicit causes (s3fs raises an OSError whose
    __cause__ is botocore's error), else None."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        kind = _kind_of(e)
        if kind:
            return kind, e
        todo += [x for x in (getattr(e, "cause", None), e.__cause__) if isinstance(x, BaseException)]
    return None


_URL = re.compile(r"(?:https?|s3a?|gs|gcs|abfss?|az)://[^\s\"'<>\]]+")


def _redacted(url: str) -> str:
    """`url` without user:password@ and without its query (a signed request's parameters)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host, query="", fragment=""))


def endpoint_named(exc: BaseException) -> str | None:
    """The first URL a backend's message names (redacted), if any."""
    found = _URL.search(str(exc))
    return _redacted(found.group(0)) if found else None


def unreachable_reason(exc: BaseException) -> str:
    """In words, why a connection failed."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc)
    if "gaierror" in names or "Name or service not known" in text or "nodename nor servname" in text:
        return "the host name does not resolve (DNS)"
    if "ConnectTimeoutError" in names or "timed out" in text.lower():
        return "the connection timed out"
    if "ConnectionClosedError" in names:
        return "the connection was closed"
    return "the connection was refused"


def throttle_hint(flag: str) -> str:
    return (f"retry later, run fewer workers, or give the client more retries with {flag} "
            f"'{{\"config_kwargs\": {{\"retries\": {{\"max_attempts\": 10, \"mode\": \"adaptive\"}}}}}}'")


def unnamed_backend_error(exc: BaseException) -> PrecomputeError | None:
    """A backend failure no location named: one line with the endpoint its message names and every flag that
    sets a location's options (which location it was is not known here)."""
    found = backend_failure(exc)
    if found is None:
        return None
    kind, culprit = found
    where = endpoint_named(culprit)
    at = f" {where}" if where else ""
    flags = f"{OPTION_FLAGS['store']} (the store) or {OPTION_FLAGS['corpus']} (the corpus)"
    if kind == "unreachable":
        return UsageError(f"cannot reach{at or ' the storage service'}: {unreachable_reason(culprit)} "
                          f"({type(culprit).__name__}); check endpoint_url in {flags}, and that the service is up")
    if kind == "throttled":
        return OperationFailed(f"storage{at} kept throttling requests after retries ({type(culprit).__name__}); "
                               + throttle_hint(flags))
    return UsageError(f"access denied{' to' + at if at else ''} ({type(culprit).__name__}): check the credentials "
                      f"in {flags} or the environment")


def one_line(exc: BaseException, limit: int = 2_000) -> str:
    """The message on one line, without terminal colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit] + " …"
