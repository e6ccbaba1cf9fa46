"""Settings of the Django example: no database, one app (ticker) with a leader duty."""

SECRET_KEY = "example-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = ["ticker"]
MIDDLEWARE: list[str] = []
DATABASES: dict = {}
USE_TZ = True
