"""Every error this project raises on purpose, in one taxonomy. Imports nothing.

- `EvitError`: the base. Every `evit` command prints its message as one line and exits with status 2
  (`evit.cli.main`); no traceback.
- `DeterministicError`: a retry repeats it (bad input, not a flaky node). Every such error derives from it, and
  the launcher never resubmits a job that raised one: the job records the error's type (`evit.launch`).
- A bad value (`ConfigError`, `CheckpointError`, `ReportError`) is also a `ValueError`, as Python's own are.
- `LaunchError`: a run that could not be brought to completion (its job was cancelled, failed more often than
  ``launcher.max_failures`` allows, or another launch of it is still running).
"""
from __future__ import annotations


class EvitError(Exception):
    """A failure the user is told about in one line."""


class DeterministicError(EvitError):
    """A failure that a retry repeats: the input must change first."""


class ConfigError(DeterministicError, ValueError):
    """A bad config key or value, command-line argument or option; the message names it."""


class DatasetError(DeterministicError):
    """A dataset is missing or not laid out as expected. The message names the path and the layout."""


class ImageError(DeterministicError):
    """An image that cannot be decoded or augmented; the message names its file (or item) and index, and the cause.

    Raised in a DataLoader worker, it reaches the training process as torch re-raises it (its message then
    quotes the worker's traceback): it keeps only its own message, the traceback's last line."""

    def __init__(self, message: str):
        if message.startswith(f"Caught {type(self).__name__}"):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class CheckpointError(DeterministicError, ValueError):
    """A checkpoint file that cannot be used: unreadable (truncated, corrupt, or needing arbitrary code),
    holding something else than expected, or (`CheckpointMismatchError`) not fitting the model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose tensors do not fit the model's architecture."""


class NonFiniteLossError(DeterministicError):
    """The training loss became NaN or infinite. No update was applied from that step on: the model and
    optimizer hold the weights before it, and the training state counts the steps before it."""

    def __init__(self, epoch: int, step: int, loss: float):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"non-finite training loss {loss} at epoch {epoch}, step {step} (global step, before "
                         "the update); the run is stopped and the last checkpoint is left as it was")


class ReportError(DeterministicError, ValueError):
    """Bad input to the report: names the file, experiment, table or reference at fault."""


class LaunchError(EvitError):
    """A run could not be brought to completion; the message says why and where the logs are."""


class PreflightError(DeterministicError):
    """A check of `evit preflight` failed (the node, DALI's decode against PIL, a measured run): the message names
    each failed check and the preflight.json that holds the figures."""
