"""The errors a user can fix: each message names the file, id or config key and the remedy.

``launch.py`` and the tools print these as one line (:func:`one_line`) without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class ConfigError(ValueError):
  """A config value is invalid, names no field, or does not fit the data or the model."""


class CheckpointError(Exception):
  """A checkpoint file cannot be read, or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
  """A pickle names a global that is not an array / tensor type of the checkpoint formats."""


class ToolError(Exception):
  """A command-line tool's own error (an argument, an input or an output in the way)."""


class DataError(FileNotFoundError):
  """A dataset or weights file the config points at is missing."""


class DatasetError(ValueError):
  """A dataset file the config points at is malformed (the message names the file / id)."""


# What launch.py reports as one line. FileNotFoundError: DataError, and an image / label file that
# vanished after the split was loaded. FloatingPointError: a non-finite loss (the newest checkpoint
# is the last good state). NotImplementedError: a config option this project does not support.
# Plain ValueErrors are left out: they may be bugs, and the config ones raise ConfigError.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, FloatingPointError, CheckpointError, ConfigError, DatasetError,
    NotImplementedError)


def one_line(error: object) -> str:
  """The message on one line (whitespace collapsed), or the type name when it is empty."""
  text = " ".join(str(error).split())
  return text or type(error).__name__


def report_error(prog: str, error: BaseException) -> int:
  """Prints ``prog: error: <message>`` on one line, the message prefixed by the error's type
  unless it is a :class:`ToolError` or one of :data:`USER_ERRORS`; returns 1 (the exit status).
  The tools' ``main`` catches everything with it: they promise one line, no traceback."""
  detail = one_line(error)
  if not isinstance(error, (ToolError,) + USER_ERRORS):
    detail = f"{type(error).__name__}: {detail}"
  print(f"{prog}: error: {detail}", file=sys.stderr)
  return 1
