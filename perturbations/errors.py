"""Error types shared by every layer.

Library code raises these with a message a user can act on; the CLI turns them into one
line on stderr and a non-zero exit. They live in the lowest layer so that ``perturbations``,
``protect`` and ``verify`` can all raise them without importing upwards.
"""

from __future__ import annotations


class ProtectError(Exception):
    """Base class: anything the user can fix (bad input, bad option, missing file)."""

    exit_code = 2


class ConfigError(ProtectError):
    """An option or parameter value that cannot work."""


class InputError(ProtectError):
    """The input folder, a label file, or an image cannot be used."""


class KeyMaterialError(ProtectError):
    """The key is missing, ambiguous or does not match a run record."""


class RecordError(ProtectError):
    """A run record is missing, unreadable or belongs to a different run."""


class WeightsError(ProtectError):
    """Model weights needed offline are missing."""
