"""WSGI entry point for gunicorn, uWSGI or mod_wsgi: ``iipserver.wsgi:application``."""

import os

from iipserver.app import make_app
from iipserver.logs import configure_logging
from iipserver.settings import Settings

settings = Settings.from_environ(os.environ)
configure_logging(settings)
application = make_app(settings)
