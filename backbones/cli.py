"""The command line of every entry point: flags from one config dataclass, user errors as one line.

    @user_errors
    def main(argv: list[str] | None = None) -> Path:
        return train(parse(TrainConfig, argv, __doc__))

:func:`parse` builds the dataclass with tyro (as CleanRL does): one ``--flag`` per field
(underscores become dashes), defaults written once in the dataclass, and ``--help`` taken
from the string literal under each field. ``bool`` fields get ``--flag`` / ``--no-flag``,
``X | None`` fields accept ``None``, ``tuple[...]`` fields take several values
(:data:`Repeatable`: one value per repeated flag). Malformed flags end with tyro's usage
message and exit code 2.

:func:`user_errors` wraps a ``main``: a mistake the user can fix (``ValueError`` and its
subclasses such as :class:`UserError` and ``backbones.tasks.TaskError``,
``FileNotFoundError``, or a failed write: :class:`backbones.files.WriteError`) ends the
command with one line ``error: <message>`` on stderr and exit code 2. With ``CEE_DEBUG=1`` in the environment it is raised with its traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Callable, TypeVar

import tyro

from backbones.files import WriteError

__all__ = ["UserError", "USER_ERRORS", "Repeatable", "parse", "user_errors"]

T = TypeVar("T")
R = TypeVar("R")

Repeatable = Annotated[tuple[str, ...], tyro.conf.UseAppendAction]
"""A field given once per value: ``--text a --text b`` -> ``("a", "b")``."""


class UserError(ValueError):
    """A mistake on the command line the user can fix (a flag out of range, flags that exclude each other)."""


USER_ERRORS = (ValueError, FileNotFoundError, WriteError)
"""What :func:`user_errors` reports as one line: bad values, unknown names, missing files, failed writes."""


def parse(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Build dataclass ``cls`` from ``argv`` (default: ``sys.argv[1:]``); ``description`` heads ``--help``."""
    return tyro.cli(cls, args=argv, description=description, prog=_prog())


def _prog() -> str | None:
    """``python -m package.module`` when the command was started that way (argparse would say ``module.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return f"python -m {name.removesuffix('.__main__')}" if name else None


def user_errors(main: Callable[..., R]) -> Callable[..., R]:
    """Decorate ``main``: a user error ends it with one line ``error: <message>`` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("CEE_DEBUG", "") not in ("", "0"):
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type's name if it has none)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
