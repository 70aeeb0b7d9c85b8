"""rlhfkit's own exceptions. Library code raises these; only the CLI turns them into one red line."""

from __future__ import annotations


class RlhfkitError(Exception):
    """A user-facing error: bad input, bad option, missing file. Printed as one line, exit code 1."""


class ConfigError(RlhfkitError):
    """An invalid option value or configuration file."""


class DataError(RlhfkitError):
    """An invalid record or data file, located as `FILE:LINE: field 'x': reason`.

    `line` is 1-based (the JSONL line, or the row number for tabular sources); `field` is a dotted
    path into the record (``completions.2.text``). Both may be None when the problem is the whole file.
    """

    def __init__(self, path: object, line: int | None = None, field: str | None = None, reason: str = "invalid"):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = reason if field is None else f"field '{field}': {reason}"
        super().__init__(f"{where}: {what}")


class NonFiniteError(RlhfkitError):
    """A NaN or infinite value where training needs a number (a loss, a gradient norm, a reward, a
    value, a KL, a weight): the run stops at that step and nothing non-finite is saved."""
