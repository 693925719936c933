"""Run one mkv volume server: stock nginx serving a directory.

    PORT=3001 python volume /tmp/volume1/

nginx runs in the foreground (this process becomes nginx), so a supervisor or
a test can stop it with SIGTERM (fast shutdown) or SIGQUIT (graceful).
The volume's own state (generated config, pid file, upload temp files) lives
in DIR/.mkv/, which nginx never lists, serves, writes or deletes; the master's
uploads wait in DIR/.tmp/ until they are MOVEd into place.

Started as root, nginx's workers run as VOLUME_USER (default nobody), never as
root; see prepare() for what the launcher changes in DIR for them.
"""
import grp
import json
import os
import pwd
import re
import shutil
import stat
import string
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
INSTALL_HINT = "install it with: sudo apt-get install nginx-light (./bringup.sh and ./test.sh do this)"
STATE = ".mkv"      # the launcher's and nginx's own files, never served
TMP = ".tmp"        # the master's uploads before their MOVE into place
ID = ".id"          # this disk's identity, made once: the index tells a wiped or replaced disk by it
DISK = "disk.json"  # in DIR/.mkv: the disk's free and used bytes, served as /.disk, kept current
                    # by start_disk_reporter() (in .mkv: nothing new among DIR's names)
DISK_EVERY = 2.0    # seconds between two writes of DISK
QUIET_BELOW = {"debug", "info", "notice", "warn"}   # VOLUME_LOGLEVELs that keep nginx's WebDAV errors
# top-level names of a volume's data: svXX subvolumes, or the flat layout's md5 hex folders
DATA_NAME = re.compile(r"sv[0-9A-F]{2}|[0-9a-f]{2}")
USAGE = """\
usage: PORT=3001 python volume DIR
  serves DIR over HTTP with nginx (WebDAV PUT/DELETE/MOVE, JSON autoindex)
  PORT               port to listen on (default 3001)
  VOLUME_BIND        address to listen on (default: every address; bringup.sh: 127.0.0.1)
  VOLUME_ACCESS_LOG  file for nginx's access log (default: off)
  VOLUME_LOGLEVEL    nginx error_log level (default: error)
  VOLUME_USER        started as root: the user nginx's workers run as (default:
                     nobody; never root). DIR, DIR/.tmp and any svXX or xx data
                     folder owned by someone else are given to that user.
  MKV_SECRET         if set: PUT, DELETE and MOVE must carry it in the header
                     Mkv-Secret (the master and the tools do); reads stay open"""

SECRET = re.compile(r"[A-Za-z0-9._-]{1,200}")   # mkvlib.settings checks MKV_SECRET the same way


class Refused(Exception):
    """A one-line reason not to start."""


def find_nginx():
    found = shutil.which("nginx")
    if found:
        return found
    for path in NGINX_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def secret_rule(secret):
    """The map line that lets a write with exactly `secret` through. A
    regex (~, case-sensitive, escaped): a plain string key would be compared
    in any letter case, and some secrets ('default', 'include') are words
    of nginx's map. SECRET allows only [A-Za-z0-9._-]: re.escape makes
    '.' and '-' literal, and nothing in it needs quoting in nginx."""
    return f'"~^{re.escape(secret)}$" 0;'


def render_config(port, user=None, access_log=None, loglevel="error", secret=None):
    """The nginx config text for a volume on `port`; its paths are relative to
    the volume folder, nginx's working directory. With a `secret`, writes
    (PUT, DELETE, MOVE) without it in the header Mkv-Secret are refused."""
    with open(os.path.join(HERE, "nginx.conf")) as f:
        template = string.Template(f.read())
    # ${name} is ours; nginx's own $variables are left as they are
    text = template.safe_substitute(
        user=f"user {user[0]} {user[1]};" if user else "",
        listen=port,
        access_log=access_log or "off",
        loglevel=loglevel,
        secret_rule=secret_rule(secret) if secret else "",
        secret_default=1 if secret else 0,
        dav_loglevel=loglevel if loglevel in QUIET_BELOW else "crit",
    )
    assert "${" not in text, "a placeholder of nginx.conf was not filled in"
    return text


def worker_account():
    """Started as root: (user, group, uid, gid) nginx's workers run as."""
    name = os.environ.get("VOLUME_USER") or "nobody"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise Refused(f"VOLUME_USER {name!r}: no such user") from None
    if pw.pw_uid == 0:
        raise Refused(f"VOLUME_USER {name!r} is root: nginx's workers must not run as root")
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        raise Refused(f"user {name!r}: its group {pw.pw_gid} has no name") from None
    return name, group, pw.pw_uid, pw.pw_gid


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def chown_tree(top, uid, gid):
    """chown -R, never following a symlink; the top last, so an interrupted
    run is seen (and finished) by the next start."""
    if not os.path.islink(top) and os.path.isdir(top):
        for folder, dirs, files in os.walk(top, topdown=False):
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), uid, gid)
    os.lchown(top, uid, gid)


def make_identity(root):
    """DIR/.id: a random name for the disk behind this folder, made the first
    time it is served and never changed. The master records it; a volume
    that answers with another one (its folder wiped, a new disk) gets no
    reads until rebalance.py has filled it."""
    path = os.path.join(root, ID)
    if not os.path.exists(path):
        with open(path + ".new", "w") as f:
            f.write(uuid.uuid4().hex + "\n")
        os.chmod(path + ".new", 0o644)
        os.rename(path + ".new", path)


def prepare(root, account=None):
    """Create DIR, DIR/.mkv and DIR/.tmp. Started as root (`account`: the
    workers' user), also make DIR usable by workers that are not root:
    - DIR and DIR/.tmp belong to the workers' user (they create folders and
      files in them);
    - DIR/.mkv belongs to root, mode 755: the workers cannot touch the config
      or pid file that root's nginx reads and writes; nginx itself gives its
      temp folders in there to the workers;
    - a top-level data folder (svXX, or xx in the flat layout) that belongs
      to someone else, e.g. written by an earlier run whose workers were
      root, is given to the workers' user with everything below it (chown
      -R). Done once: the next start finds it owned and looks no deeper, so
      files put below a folder that is already theirs are not checked.
    Refuses a DIR owned by someone else that holds names that are not a
    volume's (DIR=/ or a home folder), rather than give it away."""
    state, tmp = os.path.join(root, STATE), os.path.join(root, TMP)
    os.makedirs(root, exist_ok=True)
    if account:
        user, group, uid, gid = account
        owner = os.stat(root).st_uid
        if owner != uid:
            foreign = sorted(n for n in os.listdir(root)
                             if n not in (STATE, TMP, ID, "lost+found") and not DATA_NAME.fullmatch(n))
            if foreign:
                raise Refused(f"{root} holds {foreign[0]!r}, not a volume's, and belongs to "
                              f"{user_name(owner)}, not {user} (nginx's workers): give the volume a "
                              f"folder of its own (or, if this is one, chown {user}:{group} {root})")
            os.chown(root, uid, gid)
    os.makedirs(state, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    make_identity(root)
    if not account:
        return
    st = os.lstat(state)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise Refused(f"{state} is not a folder owned by root (made by a run as another user?): "
                      f"remove it, it holds only nginx's config, pid and temp files")
    os.chmod(state, 0o755)
    st = os.lstat(tmp)
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{tmp} is not a folder: remove it")
    if st.st_uid != uid:
        os.lchown(tmp, uid, gid)
    stale = sorted(n for n in os.listdir(root)
                   if DATA_NAME.fullmatch(n) and os.lstat(os.path.join(root, n)).st_uid != uid)
    if stale:
        print(f"volume: giving {len(stale)} data folder(s) of {root} owned by another user "
              f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}) to {user}:{group}, "
              f"nginx's workers (chown -R, once)", file=sys.stderr, flush=True)
        for name in stale:
            chown_tree(os.path.join(root, name), uid, gid)


def check_writable(root, account=None):
    """Refuse to serve a DIR where nginx's workers cannot write (a folder of
    mode 000 started and answered every PUT 500): a file is made and removed
    in DIR and in DIR/.tmp by a child process running as the workers' user."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.chdir(root)       # as nginx does: the workers need no access to the folders above
            if account:
                os.setgroups([])
                os.setgid(account[3])
                os.setuid(account[2])
            for folder in (".", TMP):
                probe = os.path.join(folder, f".mkv-write-check-{os.getpid()}")
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.unlink(probe)
        except OSError as e:
            where = os.path.normpath(os.path.join(root, os.path.dirname(e.filename or ".")))
            os.write(write_end, f"{where} ({e.strerror})".encode())
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        why = f.read().decode("utf-8", "replace")
    os.waitpid(pid, 0)
    if why:
        who = f"{account[0]} (nginx's workers)" if account else "this user"
        raise Refused(f"{who} cannot write in {why}: give the folder to that user (chown) "
                      f"and let it write there (chmod u+rwx)")


def disk_usage(root):
    st = os.statvfs(root)
    return {"free": st.f_bavail * st.f_frsize, "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "total": st.f_blocks * st.f_frsize}


def write_disk_usage(root):
    """DIR/.mkv/disk.json, written aside and renamed: never seen half-written."""
    new = os.path.join(root, STATE, DISK + ".new")
    with open(new, "w") as f:
        json.dump(disk_usage(root), f)
    os.chmod(new, 0o644)
    os.replace(new, os.path.join(root, STATE, DISK))


def start_disk_reporter(root, port):
    """A process apart (forked twice: nginx never sees it as its child)
    that rewrites DIR/.mkv/disk.json every DISK_EVERY seconds while nginx, which this
    process becomes, runs; nginx serves it read-only at /.disk, the master's
    status page shows it. It stops with nginx (it looks for its pid)."""
    write_disk_usage(root)
    nginx_pid = os.getpid()
    if os.fork():
        os.wait()
        return
    if os.fork():
        os._exit(0)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(f"mkv-disk:{port}"[:15])
        os.chdir("/")          # holds no mount busy
        while running(nginx_pid):
            time.sleep(DISK_EVERY)
            try:
                write_disk_usage(root)
            except OSError:
                pass          # the disk full or gone: the next round tries again
    finally:
        os._exit(0)


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    port = os.environ.get("PORT", "3001")
    if not port.isdigit() or not 0 < int(port) < 65536:
        print(f"volume: PORT must be a port number, not {port!r}", file=sys.stderr)
        return 2
    bind = os.environ.get("VOLUME_BIND", "")
    if bind and not re.fullmatch(r"[0-9.]+|\[[0-9a-fA-F:]+\]|localhost", bind):
        print(f"volume: VOLUME_BIND must be an IP address (or localhost), not {bind!r}", file=sys.stderr)
        return 2
    account = None
    if os.geteuid() == 0:
        try:
            account = worker_account()
        except Refused as e:
            print(f"volume: {e}", file=sys.stderr)
            return 2
    nginx = find_nginx()
    if nginx is None:
        print(f"volume: nginx not found; {INSTALL_HINT}", file=sys.stderr)
        return 1
    root = os.path.abspath(argv[1])
    try:
        prepare(root, account)
        check_writable(root, account)
    except Refused as e:
        print(f"volume: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"volume: cannot prepare {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    if account:
        print(f"volume: started as root: nginx's workers run as {account[0]}:{account[1]} (VOLUME_USER)",
              file=sys.stderr, flush=True)
    secret = os.environ.get("MKV_SECRET") or None
    if secret is not None and not SECRET.fullmatch(secret):
        print("volume: MKV_SECRET may hold only letters, digits, '.', '_' and '-' (1 to 200)", file=sys.stderr)
        return 2
    access_log = os.environ.get("VOLUME_ACCESS_LOG")
    config = render_config(
        f"{bind}:{port}" if bind else port, user=account[:2] if account else None,
        access_log=os.path.abspath(access_log) if access_log else None,
        loglevel=os.environ.get("VOLUME_LOGLEVEL", "error"), secret=secret)
    # written aside and renamed: never seen half-written; only its owner reads it (the secret)
    conf_path = os.path.join(root, STATE, "nginx.conf")
    with open(os.open(conf_path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(config)
    os.replace(conf_path + ".new", conf_path)
    sys.stdout.flush()
    # nginx runs in DIR with prefix "./": every path of its config is relative
    # to DIR. -e stderr: errors before the config is read go to stderr, not /var/log.
    os.chdir(root)
    start_disk_reporter(root, port)
    # argv[0] names the volume: nginx's master shows it in its title
    # ("nginx: master process mkv volume :3001 /srv/volume1 -e stderr ...")
    os.execv(nginx, [f"mkv volume :{port} {root}", "-e", "stderr", "-p", "./", "-c", f"{STATE}/nginx.conf"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
