"""What went wrong, where: the two kinds of failure the `onegen` command line tells apart.

* Bad input the user can fix before anything runs (arguments, config files): `UsageError` here, `ConfigError` in
  onegen.config. The CLI prints one line per problem and exits 2.
* A failure while running (a Ray task error, a storage error mid-write, a model that does not load): any other
  exception. Code marks the step it is in with `step(...)`, so the CLI can say what failed, in which step, with which
  input; it exits 1 and saves the traceback. Operational errors whose message already says what to fix
  (`UnreachableError` here, onegen.storage.StorageError, FileNotFoundError of an input) exit 1 with one line and no
  traceback file.

    with step("render shards", input=storage.uri(prefix)):
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_STEP_ATTR = "onegen_step"
_INPUT_ATTR = "onegen_input"


class UsageError(ValueError):
    """A bad command-line argument or option value; the message names it and the fix."""


class UnreachableError(ConnectionError):
    """A service the run needs (the Ray cluster, a tracking server) does not answer. The message names its address
    and how to start or reach it, so the CLI prints it as one line (exit 1) without saving a traceback."""


@contextlib.contextmanager
def step(name: str, input: object | None = None) -> Iterator[None]:  # noqa: A002 - "input" is the user's word
    """Mark exceptions raised inside with the step's name and input. The innermost step wins: it is the most precise
    place. Usage errors pass through unmarked (they are reported as bad input, not as a failed step)."""
    try:
        yield
    except Exception as err:
        if not isinstance(err, UsageError) and not hasattr(err, _STEP_ATTR):
            try:
                setattr(err, _STEP_ATTR, name)
                setattr(err, _INPUT_ATTR, None if input is None else str(input))
            except AttributeError:  # exceptions with __slots__ cannot carry attributes: leave them unmarked
                pass
        raise


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): the reason part of a
    one-line error that wraps it."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def failed_step(err: BaseException) -> tuple[str | None, str | None]:
    """(step name, input) recorded by `step`, or (None, None)."""
    return getattr(err, _STEP_ATTR, None), getattr(err, _INPUT_ATTR, None)
