"""The toolkit's error taxonomy, the lowest layer: every module may import it, it imports nothing.

- ``UserError``: bad input (a config value, a file, a folder, a checkpoint that cannot be used).
  Entrypoints print it as one ``error:`` line and exit with status 2.
- ``TrainingDiverged``: a NaN/inf loss; the message names the last good checkpoint. Exit status 1.
- ``WriteError``: an output could not be written (disk full, quota); the previous file is
  unchanged. Exit status 1.
Anything else is a bug and ends in a normal traceback.
"""

from __future__ import annotations

import os
from typing import Optional, Union


class UserError(ValueError):
    """Bad input; the message names the file, key or value and what was expected."""


class ConfigError(UserError):
    """A config that cannot be used: unknown key, wrong type, value out of range."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; ``last_good`` is the newest checkpoint written before it."""

    def __init__(self, message: str, last_good: Optional[Union[str, os.PathLike]] = None):
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
        super().__init__(f"{message} ({where})")
        self.last_good = last_good


class WriteError(OSError):
    """An output file could not be written (disk full, ...); the previous file is unchanged."""

    def __init__(self, path: Union[str, os.PathLike], cause: OSError, what: str = "file"):
        reason = cause.strerror or str(cause)
        super().__init__(
            f"{path}: could not write the {what} ({reason}); the previous file, if any, is "
            "unchanged"
        )
        self.errno = cause.errno
