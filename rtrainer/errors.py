"""Errors rtrainer raises on purpose, each with the process exit code the CLI uses.

A message is one line that names the problem: the key (``model.d_model``), the file, the offset.
The CLI prints ``error: <message>`` and exits with ``exit_code``; anything else is a bug (exit 1).

    exit 2  ConfigError      bad run file, bad --set, unknown key, wrong type, out of range
    exit 3  DataError        unreadable / malformed token data, token id out of range
    exit 3  CheckpointError  missing, truncated or corrupt checkpoint, wrong schema
    exit 4  NonFiniteError   non-finite loss/gradient with train.fail_on_non_finite, or too many
                             consecutive skipped updates
    exit 5  RunIOError       the run directory cannot be written (disk full, permissions)
    exit 6  RunLockedError   another live process holds the run directory's lock
"""

from __future__ import annotations

__all__ = ["RtrainerError", "ConfigError", "DataError", "CheckpointError", "RunIOError", "RunLockedError",
           "NonFiniteError"]


class RtrainerError(Exception):
    """Base class of every error rtrainer raises on purpose."""

    exit_code: int = 1


class ConfigError(RtrainerError):
    """The run configuration (TOML file or --set override) is invalid."""

    exit_code = 2


class DataError(RtrainerError):
    """Token data is missing, unreadable or malformed."""

    exit_code = 3


class CheckpointError(RtrainerError):
    """A checkpoint (or run state) is missing, truncated, corrupt or of the wrong schema."""

    exit_code = 3


class NonFiniteError(RtrainerError):
    """Training produced non-finite values and the run was told (or had) to stop."""

    exit_code = 4


class RunIOError(RtrainerError):
    """Writing into the run directory failed (disk full, permissions, ...)."""

    exit_code = 5


class RunLockedError(RtrainerError):
    """Another live process is training in the same run directory."""

    exit_code = 6
