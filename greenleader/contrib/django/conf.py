"""``settings.GREENLEADER``, validated: :func:`election_config`."""

from __future__ import annotations

from django.conf import settings
from django.core import exceptions

from ...errors import InvalidArgumentError
from .._config import ElectionConfig

__all__ = ["ImproperlyConfigured", "election_config"]


class ImproperlyConfigured(InvalidArgumentError, exceptions.ImproperlyConfigured):
    """Bad ``settings.GREENLEADER``: both greenleader's InvalidArgumentError and Django's own."""


def election_config() -> ElectionConfig:
    """The election's settings from ``settings.GREENLEADER`` (and the environment's fallbacks)."""
    try:
        return ElectionConfig.from_settings(getattr(settings, "GREENLEADER", None), where="settings.GREENLEADER")
    except InvalidArgumentError as exc:
        raise ImproperlyConfigured(str(exc)) from None


def status_path() -> str:
    """Where the status endpoints are served (checked by election_config())."""
    values = getattr(settings, "GREENLEADER", None)
    path = values.get("STATUS_PATH") if isinstance(values, dict) else None
    return "/" + (path if isinstance(path, str) and path else "/_greenleader").strip("/")
