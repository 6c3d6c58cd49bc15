"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero."""
from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input, missing file, offline download... anything a user fixes without reading our code."""


class ConfigError(UserError, ValueError):
    """A config file is invalid; the message names the file and the key path."""


class DataError(UserError):
    """A TIFF folder, record or manifest is not what the config says (names the field and file)."""


class WeightsUnavailableError(UserError):
    """Pretrained weights (ImageNet, cellpose) could not be downloaded or read."""


def as_user_error(exc: Exception) -> UserError:
    return exc if isinstance(exc, UserError) else UserError(str(exc))


__all__ = ["UserError", "DataError", "WeightsUnavailableError", "ConfigError", "as_user_error"]
