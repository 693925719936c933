"""Run one mkv volume server: stock nginx serving a directory.

    PORT=3001 python volume /tmp/volume1/

nginx runs in the foreground (this process becomes nginx), so a supervisor or
a test can stop it with SIGTERM (fast shutdown) or SIGQUIT (graceful).
The volume's own state (generated config, pid file, upload temp files) lives
in DIR/.mkv/, which nginx never lists, serves, writes or deletes.
"""
import os
import pwd
import shutil
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
INSTALL_HINT = "install it with: sudo apt-get install nginx-light (./bringup.sh and ./test.sh do this)"


def find_nginx():
    found = shutil.which("nginx")
    if found:
        return found
    for path in NGINX_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def render_config(root, port, user=None, access_log=None, loglevel="error"):
    """The nginx config text for a volume serving `root` on `port`."""
    state = os.path.join(root, ".mkv")
    with open(os.path.join(HERE, "nginx.conf")) as f:
        template = string.Template(f.read())
    # ${name} is ours; nginx's own $variables are left as they are
    text = template.safe_substitute(
        user=f"user {user};" if user else "",
        state=state,
        root=root,
        listen=port,
        access_log=access_log or "off",
        loglevel=loglevel,
    )
    assert "${" not in text, "a placeholder of nginx.conf was not filled in"
    return text


def worker_user(root):
    """Started as root, nginx's workers would run as `nobody` and could not
    write into a root-owned volume: run them as the directory's owner."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwuid(os.stat(root).st_uid).pw_name
    except KeyError:
        return None


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print("usage: PORT=3001 python volume DIR\n"
              "  serves DIR over HTTP with nginx (WebDAV PUT/DELETE/MOVE, JSON autoindex)\n"
              "  PORT          port to listen on (default 3001)\n"
              "  VOLUME_ACCESS_LOG  file for nginx's access log (default: off)\n"
              "  VOLUME_LOGLEVEL    nginx error_log level (default: error)",
              file=sys.stderr)
        return 2
    port = os.environ.get("PORT", "3001")
    if not port.isdigit() or not 0 < int(port) < 65536:
        print(f"volume: PORT must be a port number, not {port!r}", file=sys.stderr)
        return 2
    nginx = find_nginx()
    if nginx is None:
        print(f"volume: nginx not found; {INSTALL_HINT}", file=sys.stderr)
        return 1
    root = os.path.abspath(argv[1])
    state = os.path.join(root, ".mkv")
    try:
        os.makedirs(state, exist_ok=True)
    except OSError as e:
        print(f"volume: cannot create {state}: {e.strerror}", file=sys.stderr)
        return 1
    config = render_config(
        root, port, user=worker_user(root),
        access_log=os.environ.get("VOLUME_ACCESS_LOG"),
        loglevel=os.environ.get("VOLUME_LOGLEVEL", "error"))
    conf_path = os.path.join(state, "nginx.conf")
    with open(conf_path, "w") as f:
        f.write(config)
    sys.stdout.flush()
    # -e stderr: errors before the config is read go to stderr, not /var/log.
    os.execv(nginx, [nginx, "-e", "stderr", "-p", state, "-c", conf_path])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
