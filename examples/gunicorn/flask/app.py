"""A Flask app whose leader duty runs in exactly one gunicorn worker of the whole fleet.

Serve it with the gunicorn.conf.py next to it (see ../README.md). The duty appends a line with
its node name and term to ``$TICKER_LOG`` (default ``ticker.log``) every second while its worker
leads; ``/`` shows this worker's view of the election and the last lines of that file.
"""

import os
from datetime import datetime

import gevent
from flask import Flask, jsonify

from greenleader.gunicorn import current, duty
from greenleader.wsgi import StatusMiddleware

TICKER_LOG = os.environ.get("TICKER_LOG", "ticker.log")

app = Flask(__name__)
# /_greenleader: this worker's view of the election (JSON);
# /_greenleader/leader: 200 on the leader, 503 elsewhere (a load-balancer health check).
app.wsgi_app = StatusMiddleware(app.wsgi_app)


@duty
def ticker(term: int) -> None:
    """Runs only while this worker leads; killed (GreenletExit) when it stops leading."""
    election = current()
    while election.leads(term):  # checked right before each write: never write out of tenure
        stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
        with open(TICKER_LOG, "a") as log:
            log.write(f"{stamp} {election.node} term {term}\n")
        gevent.sleep(1)


@app.route("/")
def index():
    election = current()
    try:
        with open(TICKER_LOG) as log:
            last = log.read().splitlines()[-5:]
    except FileNotFoundError:
        last = []
    return jsonify(election=election.status() if election else None, ticker_log=last)
