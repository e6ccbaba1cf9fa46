from django.apps import AppConfig


class TickerConfig(AppConfig):
    name = "ticker"

    def ready(self) -> None:
        from . import duties  # noqa: F401  (registers the leader duty)
