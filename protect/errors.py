"""Error types of the folder pipeline (re-exported from the lowest layer)."""

from perturbations.errors import (  # noqa: F401
    ConfigError,
    InputError,
    KeyMaterialError,
    ProtectError,
    RecordError,
    WeightsError,
)
