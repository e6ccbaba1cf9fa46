"""The leader duty: appends this process's node and term to $TICKER_LOG every second."""

import os
from datetime import datetime

import gevent

from greenleader.contrib.django import current

TICKER_LOG = os.environ.get("TICKER_LOG", "ticker.log")


def tick(node: str, term: int) -> None:
    stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
    with open(TICKER_LOG, "a") as log:
        log.write(f"{stamp} {node} term {term}\n")


def ticker(term: int) -> None:
    """Runs only while this process leads; killed (GreenletExit) when it stops leading."""
    election = current()
    while election.leads(term):  # checked right before each write: never write out of tenure
        tick(election.node, term)
        gevent.sleep(1)
