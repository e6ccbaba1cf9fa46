from django.urls import path

from tests.contrib_apps.djsite.jobs.views import index, leader_view

urlpatterns = [path("", index), path("leader-only", leader_view)]
