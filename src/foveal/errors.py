"""Typed errors. Every message names the problem so a user can act on it.

All of foveal's own errors derive from FovealError; entry points (CLI, server) catch
FovealError and show its message, and treat anything else as a bug.
"""


class FovealError(Exception):
    """Base class of every error foveal raises on purpose."""


class ConfigError(FovealError, ValueError):
    """A model config is missing, malformed or names something unsupported."""


class UnsupportedModelError(ConfigError):
    """The config names an architecture or model_type foveal does not run."""


class WeightsError(FovealError, ValueError):
    """A checkpoint file is missing, truncated, corrupt, or lacks / mis-shapes a tensor."""


class ModelNotFoundError(FovealError, FileNotFoundError):
    """A model reference resolves to nothing on this machine."""


class ImageError(FovealError, ValueError):
    """An image could not be read, is of an unsupported kind, or breaks a limit."""


class PromptError(FovealError, ValueError):
    """Messages, chat template or image placeholders are inconsistent."""


class ContextLengthError(PromptError):
    """The prompt (plus what must be generated) does not fit the context window."""

    def __init__(self, needed: int, available: int, what: str = "prompt"):
        self.needed, self.available = needed, available
        super().__init__(
            f"the {what} needs {needed} tokens but the context holds {available}; "
            f"shorten it, send fewer images or use a larger context"
        )


class SamplingError(FovealError, ValueError):
    """A generation option is unknown or out of range."""


class MemoryBudgetError(FovealError):
    """A model or a request needs more memory than the device has (or than the budget allows)."""

    def __init__(self, needed: int, available: int, what: str = "the request"):
        self.needed, self.available = needed, available
        super().__init__(
            f"{what} needs {needed / 2**20:.0f} MiB more memory but only {available / 2**20:.0f} MiB are "
            f"available; use a shorter prompt or max_tokens, fewer images, a quantized model or a larger device"
        )
