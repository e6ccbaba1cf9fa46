"""Settings of the Django test site. The election's settings come from APP_STORE, APP_KEY and
APP_TTL, not from greenleader's own GREENLEADER_* variables (the test blanks those), so that
the test shows settings.GREENLEADER is what the election uses."""

import os

SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.contrib_apps.djsite.urls"
INSTALLED_APPS = ["greenleader.contrib.django", "tests.contrib_apps.djsite.jobs"]
MIDDLEWARE = ["greenleader.contrib.django.middleware.StatusMiddleware"]
DATABASES: dict = {}
USE_TZ = True
TIME_ZONE = "UTC"

GREENLEADER = {
    "STORE": os.environ.get("APP_STORE"),
    "KEY": os.environ.get("APP_KEY"),
    "TTL": os.environ.get("APP_TTL", "15"),
}
if os.environ.get("APP_NODE"):
    GREENLEADER["NODE"] = os.environ["APP_NODE"]
