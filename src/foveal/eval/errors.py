"""Errors of `foveal eval`. They derive from FovealError, so the CLI prints them as one line.

(They live here rather than in foveal.errors only because this package was written alongside
others; they can move there without changing any caller, since callers import them from
foveal.eval.)
"""

from __future__ import annotations

from ..errors import FovealError


class EvalError(FovealError):
    """Base class of evaluation errors."""


class EvalDataError(EvalError, ValueError):
    """A benchmark file is malformed, of an unknown format, or lacks what scoring needs."""


class EvalDataNotFoundError(EvalDataError, FileNotFoundError):
    """A benchmark file, annotation file or image does not exist."""


class EvalConfigError(EvalError, ValueError):
    """An option of the evaluation is unknown or inconsistent (backend, API, limit, output)."""


class EndpointError(EvalError, ConnectionError):
    """The HTTP endpoint being evaluated could not be reached or answered with an error."""


class ResumeMismatchError(EvalConfigError):
    """The partial predictions next to the report come from a different run."""
