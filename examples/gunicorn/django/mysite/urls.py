from django.urls import path
from ticker.views import index, tick_now

urlpatterns = [path("", index), path("tick-now", tick_now)]
