"""Reading the config file: its text from disk, checked by common/config.py;
a bad one is one ``StartupError`` line (exit 2)."""

from __future__ import annotations

from pathlib import Path

from common.config import Config, ConfigError, load_config
from common.errors import StartupError


def read_config(path: str) -> Config:
    """Load a config file; a bad one is one ``StartupError`` line (exit 2)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read config {path}: {exc.strerror or exc} (check "
                           "--config)") from None

    def read_file(name: str) -> bytes:  # load_config made it relative to the config already
        return Path(name).read_bytes()

    try:
        return load_config(data, str(p), read_file)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
