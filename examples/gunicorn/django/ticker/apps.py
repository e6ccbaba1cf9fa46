from django.apps import AppConfig


class TickerConfig(AppConfig):
    name = "ticker"
    # Run by greenleader.contrib.django in the one process that leads (a gunicorn worker, or
    # `manage.py greenleader run`), each called with the tenure's fencing term.
    leader_duties = ["ticker.duties.ticker"]
