"""Framework integrations: Django (:mod:`greenleader.contrib.django`) and Flask
(:mod:`greenleader.contrib.flask`), the gunicorn hooks they share
(:mod:`greenleader.contrib.gunicorn`), and APScheduler (:mod:`greenleader.contrib.apscheduler`).

Each integration reads the election's settings where its users keep theirs (``settings.GREENLEADER``,
``app.config``), runs the leader duties (:mod:`greenleader.duties`) in the gunicorn worker that
leads (through :mod:`greenleader.gunicorn`) or in a worker process of its own outside gunicorn,
serves the status endpoints (:mod:`greenleader.wsgi`) and offers a ``leader_only`` decorator.
See docs/integrations.md.
"""

from __future__ import annotations

from ._config import ElectionConfig
from ._election import ProcessElection, current

__all__ = ["ElectionConfig", "ProcessElection", "current"]
