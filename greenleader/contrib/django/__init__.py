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

from ...duties import duty
from .._election import current
from .decorators import leader_only

__all__ = ["current", "duty", "leader_only"]
