from django.http import JsonResponse

from greenleader.gunicorn import current

from .duties import TICKER_LOG


def index(request):
    election = current()
    try:
        with open(TICKER_LOG) as log:
            last = log.read().splitlines()[-5:]
    except FileNotFoundError:
        last = []
    return JsonResponse({"election": election.status() if election else None, "ticker_log": last})
