"""A leader-only command: appends its node and term to ONCE_LOG, then sleeps --sleep seconds."""

import json
import os
import time

import gevent
from django.core.management.base import BaseCommand

from greenleader.contrib.django import leader_only


@leader_only
class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("--sleep", type=float, default=0.0)

    def handle(self, *args, **options):
        with open(os.environ["ONCE_LOG"], "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "term": self.leader_term, "t": time.monotonic()}) + "\n")
        gevent.sleep(options["sleep"])
        return "done"
