"""``@leader_only``, for views and for management commands.

On a view, the view runs only in the process that leads (the gunicorn worker, or
``manage.py greenleader run``); every other one answers 503 with the election's status as JSON,
or what ``response(request)`` returns::

    @leader_only
    def run_billing_now(request): ...

    @leader_only(response=lambda request: redirect("billing-status"))
    def run_billing_now(request): ...

Behind a load balancer that routes to ``/_greenleader/leader-master``, a request reaches the
leader's master but any of its workers: retry on 503, or keep such views off the load balancer.

On a management command class, ``handle()`` runs only while this process leads the command's
own key (``<KEY>/commands/<command name>``, or ``key=``), so that a cron line installed on every
host runs the command on one of them at a time; the others skip it (exit 0, a line on stdout
unless ``-v 0``)::

    @leader_only                   # or @leader_only(wait=30): wait up to 30 s for the holder
    class Command(BaseCommand):
        def handle(self, *args, **options):
            send_invoices(fencing_token=self.leader_term)

``handle()`` runs as a leader duty: if the tenure ends under it (the store lost, a deadline
missed) it is killed before the key is released and the command fails with exit code 3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from django.core.management.base import BaseCommand, CommandError
from django.http import HttpRequest, HttpResponse

from ...errors import InvalidArgumentError
from ...stores.base import check_float, check_text
from .._election import current, patch_gevent, run_as_leader
from .conf import election_config
from .middleware import status_response

__all__ = ["EXIT_LEADERSHIP_LOST", "leader_only"]

#: Exit code of a leader-only command whose tenure ended while it ran (as ``greenleader run``).
EXIT_LEADERSHIP_LOST = 3

F = TypeVar("F", bound=Callable[..., Any])


def leader_only(target: F | None = None, *, response: Callable[[HttpRequest], HttpResponse] | None = None,
                key: str | None = None, wait: float = 0.0) -> Any:
    """Decorate a view (``response``: what non-leaders answer, default 503 and the status as
    JSON) or a management command class (``key``: its election key; ``wait``: seconds to wait
    for another holder to finish, default 0: skip at once)."""
    if target is None:
        return lambda func: leader_only(func, response=response, key=key, wait=wait)
    if isinstance(target, type):
        if not issubclass(target, BaseCommand):
            raise InvalidArgumentError(f"leader_only decorates views and BaseCommand classes, not {target.__name__}")
        if response is not None:
            raise InvalidArgumentError("leader_only(response=...) is for views; a command skips")
        return _command(target, key, check_float("wait", wait, minimum=0.0))
    if not callable(target):
        raise InvalidArgumentError(f"leader_only decorates views and commands, not {type(target).__name__}")
    if key is not None or wait:
        raise InvalidArgumentError("leader_only(key=..., wait=...) is for management commands")
    return _view(target, response)


def _view(view: F, response: Callable[[HttpRequest], HttpResponse] | None) -> F:
    @functools.wraps(view)
    def leader_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        election = current()
        if election is not None and election.is_leader():
            return view(request, *args, **kwargs)
        if response is not None:
            return response(request)
        return status_response(request, "leader")

    return leader_view  # type: ignore[return-value]


def _command(cls: type[BaseCommand], key: str | None, wait: float) -> type[BaseCommand]:
    handle = cls.handle
    name = cls.__module__.rsplit(".", 1)[-1]
    if key is not None:
        check_text("key", key)

    @functools.wraps(handle)
    def leader_handle(self: BaseCommand, *args: Any, **options: Any) -> Any:
        config = election_config()
        config = replace(config, key=key or f"{config.key}/commands/{name}")
        patch_gevent()

        def run(term: int) -> Any:
            self.leader_term = term
            return handle(self, *args, **options)

        outcome = run_as_leader(run, config, wait=wait)
        if not outcome.ran:
            if options.get("verbosity", 1) >= 1:
                holder = outcome.leader or "another process"
                self.stdout.write(f"skipped: {holder} holds {config.key}")
            return None
        if outcome.lost:
            raise CommandError(f"lost the leadership of {config.key} while running; stopped",
                               returncode=EXIT_LEADERSHIP_LOST)
        return outcome.value

    cls.handle = leader_handle
    return cls
