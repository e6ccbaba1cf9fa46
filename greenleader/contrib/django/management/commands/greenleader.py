"""``manage.py greenleader status`` (who leads) and ``manage.py greenleader run`` (a worker
process that runs the leader duties under election, outside gunicorn)."""

from __future__ import annotations

import signal
from typing import Any

import gevent
from django.core.management.base import BaseCommand, CommandError, CommandParser

from greenleader.contrib._election import ProcessElection, patch_gevent, read_status
from greenleader.contrib.django.conf import election_config
from greenleader.duties import duties
from greenleader.errors import GreenleaderError, StoreError

#: ``status`` exit codes: a leader (0), no leader (1), the store unreachable (69, EX_UNAVAILABLE).
EXIT_NO_LEADER = 1
EXIT_STORE_UNAVAILABLE = 69


class Command(BaseCommand):
    help = ("greenleader's election, from settings.GREENLEADER. 'status': who leads (exit 0; 1 when "
            "nobody does; 69 when the store cannot be reached). 'run': run the leader duties under "
            "election in this process until SIGTERM or SIGINT (for a worker managed by systemd etc.).")
    requires_system_checks: list[str] = []  # status must answer even where a check fails

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{status,run}")
        status = sub.add_parser("status", help="who leads the key")
        status.add_argument("--json", action="store_true", help="one JSON object: key, leader, term, duties")
        sub.add_parser("run", help="run the leader duties under election until SIGTERM/SIGINT")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "status":
            self.status(as_json=options["json"])
        else:
            self.run()

    def status(self, *, as_json: bool) -> None:
        config = election_config()
        try:
            leader, text = read_status(config, [d.name for d in duties], as_json=as_json)
        except StoreError as exc:
            raise CommandError(f"the store is unreachable: {exc}", returncode=EXIT_STORE_UNAVAILABLE) from None
        except GreenleaderError as exc:  # a bad URL or option, a missing client library
            raise CommandError(str(exc)) from None
        self.stdout.write(text)
        if leader is None:
            raise CommandError(f"no leader for {config.key}", returncode=EXIT_NO_LEADER)

    def run(self) -> None:
        config = election_config()
        patch_gevent()
        election = ProcessElection(config)
        handlers = [gevent.signal_handler(signum, election.stopping.set) for signum in (signal.SIGTERM, signal.SIGINT)]
        try:
            self.stdout.write(f"{election.node}: campaigning for {config.key}; duties: "
                              f"{', '.join(d.name for d in duties) or '(none registered)'}")
            self.stdout.flush()
            election.start()  # retries the store until it can be made, or a signal
            election.stopping.wait()
        finally:
            election.stop()  # the duties stop before the key is released
            for handler in handlers:
                handler.cancel()
        self.stdout.write(f"{election.node}: stopped")
