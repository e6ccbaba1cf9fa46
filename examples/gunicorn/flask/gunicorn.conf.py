# gunicorn settings for the Flask example: gevent workers, each running for election.
# The store, key and TTL come from GREENLEADER_STORE, GREENLEADER_KEY and GREENLEADER_TTL.
import logging

from greenleader.gunicorn import post_fork, worker_exit  # noqa: F401  (the election's two hooks)

worker_class = "gevent"
workers = 4

# Show greenleader's INFO lines (elected, stepped down, ...) next to gunicorn's.
logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(name)s] %(message)s")
