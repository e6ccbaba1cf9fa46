# gunicorn settings for the Django example: gevent workers, each running for election.
# The election's settings come from settings.GREENLEADER (and the environment it falls back to).
import logging

from greenleader.contrib.gunicorn import child_exit, post_fork, worker_exit  # noqa: F401  (the election's hooks)

worker_class = "gevent"
workers = 4

# Show greenleader's INFO lines (elected, stepped down, ...) next to gunicorn's, with their level.
logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] [%(name)s] %(message)s")
