"""Settings of the Django example: no database, one app (ticker) with a leader duty."""

SECRET_KEY = "example-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = ["greenleader.contrib.django", "ticker"]
# First, so that a load balancer's health check needs no session, login or allowed Host:
# /_greenleader, /_greenleader/leader, /_greenleader/leader-master.
MIDDLEWARE = ["greenleader.contrib.django.middleware.StatusMiddleware"]
DATABASES: dict = {}
USE_TZ = True
# Django sets the process's time zone (TZ) from this, so the log's timestamps follow it too;
# left out, it is America/Chicago.
TIME_ZONE = "UTC"

# The election. Names left out fall back to the environment: here the store's address and the
# TTL come from $GREENLEADER_STORE and $GREENLEADER_TTL (operators set them per deployment).
GREENLEADER = {
    "KEY": "examples/ticker",
}
