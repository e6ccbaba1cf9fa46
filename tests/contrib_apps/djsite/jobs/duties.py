from greenleader.contrib.django import current
from tests.contrib_apps.duty_log import run_duty


def tick(term: int) -> None:
    run_duty(current(), term)
