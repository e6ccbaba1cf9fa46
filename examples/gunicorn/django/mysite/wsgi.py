"""WSGI entry point for gunicorn: ``gunicorn -c gunicorn.conf.py mysite.wsgi``."""

import os

from django.core.wsgi import get_wsgi_application

from greenleader.wsgi import StatusMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

# /_greenleader: this worker's view of the election (JSON);
# /_greenleader/leader: 200 on the leader, 503 elsewhere (a load-balancer health check).
application = StatusMiddleware(get_wsgi_application())
