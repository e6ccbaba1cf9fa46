from django.http import JsonResponse

from greenleader.contrib.django import current, leader_only

from .duties import TICKER_LOG, tick


def index(request):
    election = current()
    try:
        with open(TICKER_LOG) as log:
            last = log.read().splitlines()[-5:]
    except FileNotFoundError:
        last = []
    return JsonResponse({"election": election.status() if election else None, "ticker_log": last})


@leader_only  # 503 and the election's status on every other worker
def tick_now(request):
    election = current()
    term = election.term
    if term is not None and election.leads(term):
        tick(election.node, term)
    return JsonResponse({"ticked_by": election.node, "term": term})
