"""A Flask app whose leader duty runs in exactly one gunicorn worker of the whole fleet.

Serve it with the gunicorn.conf.py next to it (see ../README.md). The duty appends a line with
its node name and term to ``$TICKER_LOG`` (default ``ticker.log``) every second while its worker
leads; ``/`` shows this worker's view of the election and the last lines of that file.
"""

import os
from datetime import datetime

import gevent
from flask import Flask, jsonify

from greenleader.contrib.flask import GreenLeader, current, leader_only

TICKER_LOG = os.environ.get("TICKER_LOG", "ticker.log")

app = Flask(__name__)
# The election. Settings left out fall back to the environment: here the store's address and the
# TTL come from $GREENLEADER_STORE and $GREENLEADER_TTL (operators set them per deployment).
app.config["GREENLEADER_KEY"] = "examples/ticker"
# Also serves /_greenleader (this worker's view of the election, JSON), /_greenleader/leader and
# /_greenleader/leader-master (the load balancer's health check; see ../README.md).
leader = GreenLeader(app)


def tick(node: str, term: int) -> None:
    stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
    with open(TICKER_LOG, "a") as log:
        log.write(f"{stamp} {node} term {term}\n")


@leader.duty
def ticker(term: int) -> None:
    """Runs only while this worker leads; killed (GreenletExit) when it stops leading."""
    election = current()
    while election.leads(term):  # checked right before each write: never write out of tenure
        tick(election.node, term)
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


@app.route("/tick-now")
@leader_only  # 503 and the election's status on every other worker
def tick_now():
    election = current()
    term = election.term
    if term is not None and election.leads(term):
        tick(election.node, term)
    return jsonify(ticked_by=election.node, term=term)
