"""gunicorn config of the framework tests: the contrib hooks, which take the election's settings
from the app (settings.GREENLEADER, app.config), as the integrations' users write it."""

from greenleader.contrib.gunicorn import post_fork, worker_exit  # noqa: F401

worker_class = "gevent"
graceful_timeout = 5  # a worker forked just as its master stops misses the SIGTERM until this
control_socket_disable = True  # gunicorn >= 27: keep the tests out of ~/.gunicorn
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "formatters": {"plain": {"format": "%(asctime)s [%(process)d] %(name)s %(levelname)s %(message)s"}},
}
