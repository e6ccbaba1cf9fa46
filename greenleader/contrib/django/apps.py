"""The app config: registers the duties the installed apps declare, and hands the settings to
the gunicorn hooks (:mod:`greenleader.contrib.gunicorn`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.apps import AppConfig, apps
from django.core import checks
from django.utils.module_loading import import_string

from ...duties import duties
from .. import gunicorn as _contrib_gunicorn
from .conf import ImproperlyConfigured, election_config

__all__ = ["GreenleaderConfig"]


class GreenleaderConfig(AppConfig):
    """``greenleader.contrib.django``. Any installed app declares its leader duties with a
    ``leader_duties`` attribute on its own AppConfig: dotted paths (or the functions), each
    called with the fencing term in the process that leads::

        class BillingConfig(AppConfig):
            name = "billing"
            leader_duties = ["billing.duties.send_invoices"]
    """

    name = "greenleader.contrib.django"
    label = "greenleader"
    verbose_name = "greenleader"

    def ready(self) -> None:
        for config in apps.get_app_configs():
            for entry in getattr(config, "leader_duties", ()) or ():
                func = _resolve(config, entry)
                if not any(d.func is func for d in duties):  # keep a @duty(on_error=...)'s policy
                    duties.register(func)
        _contrib_gunicorn.use_settings(election_config)
        checks.register(check_settings, "greenleader")


def _resolve(config: AppConfig, entry: Any) -> Callable[[int], Any]:
    where = f"{type(config).__module__}.{type(config).__qualname__}.leader_duties"
    if isinstance(entry, str):
        try:
            entry = import_string(entry)
        except ImportError as exc:
            raise ImproperlyConfigured(f"{where}: cannot import {entry!r}: {exc}") from None
    if not callable(entry):
        raise ImproperlyConfigured(f"{where}: {entry!r} is not a function (of the fencing term)")
    return entry  # type: ignore[no-any-return]


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check``: bad GREENLEADER settings are errors; missing ones (often set only in
    production's environment) a warning."""
    try:
        election_config()
    except ImproperlyConfigured as exc:
        text = str(exc)
        if "no STORE" in text or "no KEY" in text:
            return [checks.Warning(text, hint="the election cannot run here", id="greenleader.W001")]
        return [checks.Error(text, id="greenleader.E001")]
    return []
