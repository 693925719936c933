# gunicorn reads this file from the working directory by default; flags on the
# command line win over it.
# The gevent worker monkey-patches the standard library when it starts; this
# file is read by the arbiter before that, and mkvlib imports urllib3 (and so
# ssl), so patch first, as gevent asks, or every worker warns about ssl.
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import mkvlib  # noqa: E402

worker_class = "gevent"
worker_connections = 1000
keepalive = 30          # seconds; clients of a blob store come back
graceful_timeout = 30
# gunicorn 27's control socket is one fixed path per user: two masters on one
# machine (or a test run beside a cluster) would take it from each other.
control_socket_disable = True


def on_starting(server):
    """Check the settings and create the index once, before any worker forks:
    bad settings stop the start with one line and exit status 1."""
    try:
        settings = mkvlib.Settings.from_env()
        mkvlib.Index(settings.db).close()
    except mkvlib.SettingsError as e:
        sys.exit(f"mkv: {e}")
    server.log.info("mkv: %d volume(s), %d replica(s), %d subvolume(s), index %s",
                    len(settings.volumes), settings.replicas, settings.subvolumes, settings.db)
