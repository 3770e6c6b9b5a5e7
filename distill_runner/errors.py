"""The errors users see as one line (bad configuration or input: ConfigError; a disk that is full or a folder that
cannot be written: StorageError), and the one way config nodes are built (``hydra.utils.instantiate``) with errors
that name the key.

Docs: docs/tested.md
"""

from __future__ import annotations

import re


class UserError(ValueError):
    """What a user sees as one line, no traceback (the CLIs catch it; exit code 2): the key (or folder), the value
    and the fix. Raise one of its kinds: :class:`ConfigError` or :class:`StorageError`."""

    def __init__(self, key: str, value: object, fix: str, also: tuple[str, ...] = ()):
        self.key, self.value, self.fix, self.also = key, value, fix, also  # also: other keys of the node in the fix
        super().__init__(f"{key}={value!r}: {fix}")


class StorageError(UserError):
    """A disk (or quota) that is full, or a folder that cannot be written: where, how much, the fix."""


class ConfigError(UserError):
    """A bad config value or bad input: names the key, the value and the fix, on one line.

    Code that builds one config node (a model or data set factory) names its own parameter
    (``arch``); :func:`instantiate` places it under the node (``student.model.arch``).
    """

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under a config node: 'arch' -> 'student.model.arch', in the fix
        too ('set weights=null' -> 'set teacher.model.weights=null'), so the override it shows can be pasted."""
        fix = self.fix
        for key in (self.key, *self.also):
            fix = re.sub(rf"(?<![\w.]){re.escape(key)}=", f"{prefix}.{key}=", fix)
        return ConfigError(f"{prefix}.{self.key}", self.value, fix, tuple(f"{prefix}.{k}" for k in self.also))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``run_dir`` is the folder its checkpoints are in (what a resume continues)."""

    def __init__(self, run_dir):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


class BadImageError(RuntimeError):
    """An image file that passed the up-front check failed to decode."""


def instantiate(node, key: str, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``; a failure is a :class:`ConfigError` under ``key``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate
    from omegaconf import OmegaConf

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause.under(key) from None
        target = OmegaConf.select(node, "_target_") if OmegaConf.is_config(node) else dict(node).get("_target_")
        fix = f"could not be built: {cause or exc}".replace("\n", " ")
        raise ConfigError(key, target, fix) from None
