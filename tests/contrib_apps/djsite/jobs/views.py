import os

from django.http import JsonResponse

from greenleader.contrib.django import current, leader_only


def index(request):
    election = current()
    return JsonResponse({"pid": os.getpid(), "node": election.node if election else None})


@leader_only
def leader_view(request):
    election = current()
    return JsonResponse({"node": election.node, "term": election.term})
