from django.urls import path
from ticker.views import index

urlpatterns = [path("", index)]
