"""The one exception type for the user's errors.

Everything the user can get wrong (a config field, a flag, a file, a checkpoint, a record) is raised as a
`UserError` (or one of its subclasses: ConfigError, CheckpointError, ConversionError, ...), with a message
that names the file, field, tensor or record at fault. The CLI prints such a message on one line, without a
traceback, and exits 2; any other exception is a bug and is printed with its traceback (exit 1).

`UserError` subclasses ValueError so library callers that catch ValueError keep working.
"""
from __future__ import annotations


class UserError(ValueError):
  """Bad input: the message says what and where; no traceback is needed to fix it."""
