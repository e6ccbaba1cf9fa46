"""Django integration: add ``"greenleader.contrib.django"`` to ``INSTALLED_APPS``.

- settings: ``GREENLEADER = {"STORE": "consul://...", "KEY": "myapp/scheduler", "TTL": 15}``
  (missing names fall back to ``$GREENLEADER_STORE``, ``$GREENLEADER_KEY``, ``$GREENLEADER_TTL``);
- duties: ``leader_duties = ["myapp.duties.send_reminders"]`` on any app's ``AppConfig``;
- gunicorn: ``from greenleader.contrib.gunicorn import post_fork, worker_exit`` in gunicorn.conf.py;
- a worker process instead of (or next to) gunicorn: ``manage.py greenleader run``;
  who leads: ``manage.py greenleader status``;
- ``"greenleader.contrib.django.middleware.StatusMiddleware"`` first in ``MIDDLEWARE``;
- ``@leader_only`` on views (503 elsewhere) and on management commands (run by one process at a time).

See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

from ...duties import duty

__all__ = ["current", "duty", "leader_only"]


def current() -> Any:
    """This process's election (gunicorn worker or ``manage.py greenleader run``), or None."""
    from .._election import current as _current

    return _current()


def leader_only(*args: Any, **kwargs: Any) -> Any:
    """See :func:`greenleader.contrib.django.decorators.leader_only`."""
    from .decorators import leader_only as _leader_only

    return _leader_only(*args, **kwargs)
