"""gunicorn config of the metrics tests: conf.py's settings, and the child_exit hook that drops a
dead worker's live gauges in Prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR)."""

from greenleader.gunicorn import child_exit  # noqa: F401
from tests.gunicorn_apps.conf import *  # noqa: F403
