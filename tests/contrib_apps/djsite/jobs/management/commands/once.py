"""A leader-only command: appends its pid and term to ONCE_LOG, then waits until the file
--until exists (the test holds it running as long as it needs)."""

import json
import os
import time

import gevent
from django.core.management.base import BaseCommand

from greenleader.contrib.django import leader_only


@leader_only
class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("--until", default=None)

    def handle(self, *args, **options):
        with open(os.environ["ONCE_LOG"], "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "term": self.leader_term, "t": time.monotonic()}) + "\n")
        while options["until"] and not os.path.exists(options["until"]):
            gevent.sleep(0.02)
        return "done"
