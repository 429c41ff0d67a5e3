"""The folder pipeline: discover, load, key, perturb, write, record.

>>> from protect import ProtectOptions, load_keyring, protect_folder
>>> summary = protect_folder("photos/", "photos-protected/", load_keyring(key_file="owner.key"),
...                          ProtectOptions(method="cuda"))
"""

from .discover import Dataset, ImageEntry, discover, discover_files, discover_inputs
from .errors import ConfigError, InputError, KeyMaterialError, ProtectError, RecordError
from .inspect import inspect_run
from .keys import derive_keyring, generate_key, load_keyring, resolve_key
from .pipeline import ProtectOptions, Summary, protect_folder

__all__ = [
    "ConfigError",
    "Dataset",
    "ImageEntry",
    "InputError",
    "KeyMaterialError",
    "ProtectError",
    "ProtectOptions",
    "RecordError",
    "Summary",
    "derive_keyring",
    "discover",
    "discover_files",
    "discover_inputs",
    "generate_key",
    "inspect_run",
    "load_keyring",
    "protect_folder",
    "resolve_key",
]
