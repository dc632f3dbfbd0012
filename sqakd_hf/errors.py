"""The exception types of sqakd_hf, in one place (no imports from the rest of the package).

* :class:`InputError` (and :class:`RecipeError`, :class:`DataError`): bad user input, found before
  any work starts; the CLI prints it as one line and exits with status 2.
* :class:`SQAKDCheckpointError`: a checkpoint that cannot be loaded as it claims.
* :class:`PushToHubError`: an upload that failed, with the folder kept for a retry.
* :class:`NonFiniteError`: training saw NaN/inf values (first bad step, cause, fix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["InputError", "RecipeError", "DataError", "SQAKDCheckpointError", "PushToHubError", "NonFiniteError"]


class InputError(ValueError):
    """Bad user input (recipe, data, paths), reported before any work starts."""


class RecipeError(InputError):
    """A recipe or command-line override that cannot be used as given."""


class DataError(InputError):
    """The data cannot be used as configured (missing file/split/column, wrong modality)."""


class SQAKDCheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupted file, or contents that contradict its config."""


class PushToHubError(RuntimeError):
    """Uploading to the Hub failed; the message says which step failed, where the files are, how to retry.
    ``folder`` is the kept staging folder (packed model + README.md), ready for a retry."""

    def __init__(self, message: str, folder: Optional[Path] = None) -> None:
        super().__init__(message)
        self.folder = folder


class NonFiniteError(RuntimeError):
    """Training saw NaN/inf values; the message names the first bad step, the cause and the fix."""
