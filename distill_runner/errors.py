"""The one error type users see for bad configuration or bad input."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value or bad input: names the key, the value and the fix, on one line.

    Code that builds one config node (a model or data set factory) names its own parameter
    (``arch``); :func:`distill_runner.runner.build` places it under the node (``student.model.arch``).
    """

    def __init__(self, key: str, value: object, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under a config node: 'arch' -> 'student.model.arch'."""
        return ConfigError(f"{prefix}.{self.key}", self.value, self.fix)


class BadImageError(RuntimeError):
    """An image file that passed the up-front check failed to decode."""
