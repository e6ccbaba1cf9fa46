"""The leader duty: appends this worker's node and term to $TICKER_LOG every second."""

import os
from datetime import datetime

import gevent

from greenleader.gunicorn import current, duty

TICKER_LOG = os.environ.get("TICKER_LOG", "ticker.log")


@duty
def ticker(term: int) -> None:
    """Runs only while this worker leads; killed (GreenletExit) when it stops leading."""
    election = current()
    while election.leads(term):  # checked right before each write: never write out of tenure
        stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
        with open(TICKER_LOG, "a") as log:
            log.write(f"{stamp} {election.node} term {term}\n")
        gevent.sleep(1)
