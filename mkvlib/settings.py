"""Settings: every MKV_* variable, read once at the edge (mkv.py, the tools)
into a plain frozen object, parsed and checked there with a one-line reason."""
import dataclasses
import os
import re

from mkvlib.errors import SettingsError
from mkvlib.placement import MAX_SUBVOLUMES, key2volume

SECRET_HEADER = "Mkv-Secret"                         # carries MKV_SECRET, to the master and to the volumes
SECRET_CHARS = re.compile(r"[A-Za-z0-9._-]{1,200}")   # what a volume's nginx config can hold as it is
HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")   # a name, an IPv4 or a [bracketed IPv6] address
# MKV_* variables read elsewhere: bringup.sh's, the test suite's, and the run
# folder the master's start names for its workers (mkvlib.health)
OTHER_NAMES = {"MKV_HOME", "MKV_HEALTH_DIR", "MKV_FUZZ_EXAMPLES", "MKV_FUZZ_COUNT_FILE",
               "MKV_S3_KEYS", "MKV_S3_REGION", "MKV_S3_DOMAIN", "MKV_S3_VOLUME_DIRS"}   # MKV_S3_*: S3Settings


def _parse_hostport(name, value):
    host, sep, port = value.rpartition(":")
    if not sep or not HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{name}: {value!r} is not host:port"
                            + (" (separate volumes with commas)" if name == "MKV_VOLUMES" else ""))
    return value


def _parse_int(name, value, low, high):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a whole number") from None
    if not low <= n <= high:
        raise SettingsError(f"{name}: {n} is out of range ({low} to {high})")
    return n


def _parse_seconds(name, value, high):
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a number of seconds") from None
    if not 0 < seconds <= high:
        raise SettingsError(f"{name}: {seconds} is out of range (0 to {high} seconds)")
    return seconds


def _parse_bool(name, value):
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: {value!r} is not on/off")


def _parse_volumes(value):
    volumes = value
    if isinstance(volumes, str):
        volumes = [v.strip() for v in volumes.split(",") if v.strip()]
    if not volumes:
        raise SettingsError("MKV_VOLUMES is empty: name the volume servers, "
                            "e.g. MKV_VOLUMES=localhost:3001,localhost:3002,localhost:3003")
    volumes = tuple(_parse_hostport("MKV_VOLUMES", v) for v in volumes)
    if len(set(volumes)) != len(volumes):
        raise SettingsError(f"MKV_VOLUMES names a volume twice: {','.join(volumes)}")
    return volumes


def _parse_secret(value):
    secret = value or None
    if secret is not None and not SECRET_CHARS.fullmatch(secret):
        raise SettingsError("MKV_SECRET may hold only letters, digits, '.', '_' and '-' (1 to 200)")
    return secret


def unknown_names(env=None):
    """The MKV_* variables of `env` that nothing reads (a typo, say), each
    with the setting it most looks like: [(name, guess or None)]."""
    import difflib
    env = os.environ if env is None else env
    known = {name for name, _ in Settings.ENV.values()} | OTHER_NAMES
    suffixes = sorted(name[4:] for name in known)      # compared without the MKV_ they all share

    def guess(name):
        close = difflib.get_close_matches(name[4:], suffixes, n=1)
        return "MKV_" + close[0] if close else None
    return [(name, guess(name)) for name in sorted(env) if name.startswith("MKV_") and name not in known]


@dataclasses.dataclass(frozen=True)
class Settings:
    volumes: tuple
    db: str
    replicas: int = 3
    subvolumes: int = 10
    protect: bool = False
    fallback: str = None
    voltimeout: float = 1.0
    get_check: bool = False
    secret: str = dataclasses.field(default=None, repr=False)
    client_connections: int = 1000        # per worker, from one client address (connections.py)
    send_timeout: float = 30.0            # seconds a client may take to take a piece of its answer
    list_bytes: int = 32 << 20            # key bytes one listing page may hold
    admin_port: int = None        # the admin listener (admin.py): /metrics, /health/*, the status page
    admin_bind: str = "127.0.0.1"
    log_format: str = "text"      # or "json": one JSON object a line

    ENV = {"volumes": ("MKV_VOLUMES", ""), "db": ("MKV_DB", ""), "replicas": ("MKV_REPLICAS", "3"),
           "subvolumes": ("MKV_SUBVOLUMES", "10"), "protect": ("MKV_PROTECT", ""),
           "fallback": ("MKV_FALLBACK", ""), "voltimeout": ("MKV_VOLTIMEOUT", "1"),
           "get_check": ("MKV_GET_CHECK", ""), "secret": ("MKV_SECRET", ""),
           "client_connections": ("MKV_CLIENT_CONNECTIONS", "1000"),
           "send_timeout": ("MKV_SEND_TIMEOUT", "30"), "list_bytes": ("MKV_LIST_BYTES", str(32 << 20)),
           "admin_port": ("MKV_ADMIN_PORT", ""), "admin_bind": ("MKV_ADMIN_BIND", "127.0.0.1"),
           "log_format": ("MKV_LOG_FORMAT", "text")}

    @classmethod
    def from_env(cls, env=None, **overrides):
        """Read MKV_* from `env` (default os.environ); a non-None keyword
        (volumes=, db=, replicas=, ...) wins over the environment."""
        env = os.environ if env is None else env
        raw = {field: env.get(name, default) for field, (name, default) in cls.ENV.items()}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        volumes = _parse_volumes(raw["volumes"])
        if not raw["db"]:
            raise SettingsError("MKV_DB is empty: give the index file, e.g. MKV_DB=/var/lib/mkv/index.sqlite3")
        replicas = _parse_int("MKV_REPLICAS", raw["replicas"], 1, 1000)
        if replicas > len(volumes):
            raise SettingsError(f"MKV_REPLICAS={replicas} but MKV_VOLUMES has only "
                                f"{len(volumes)} volume(s): need at least as many volumes as replicas")
        subvolumes = _parse_int("MKV_SUBVOLUMES", raw["subvolumes"], 1, MAX_SUBVOLUMES)
        voltimeout = _parse_seconds("MKV_VOLTIMEOUT", raw["voltimeout"], 600)
        secret = _parse_secret(raw["secret"])
        fallback = raw["fallback"] or None
        if fallback:
            _parse_hostport("MKV_FALLBACK", fallback)
        admin_port = _parse_int("MKV_ADMIN_PORT", raw["admin_port"], 1, 65535) if raw["admin_port"] else None
        if raw["log_format"] not in ("text", "json"):
            raise SettingsError(f"MKV_LOG_FORMAT: {raw['log_format']!r} is neither text nor json")
        return cls(volumes=volumes, db=os.path.abspath(str(raw["db"])), replicas=replicas,
                   subvolumes=subvolumes, protect=_parse_bool("MKV_PROTECT", raw["protect"]),
                   fallback=fallback, voltimeout=voltimeout,
                   get_check=_parse_bool("MKV_GET_CHECK", raw["get_check"]), secret=secret,
                   client_connections=_parse_int("MKV_CLIENT_CONNECTIONS", raw["client_connections"], 1, 1 << 20),
                   send_timeout=_parse_seconds("MKV_SEND_TIMEOUT", raw["send_timeout"], 3600),
                   list_bytes=_parse_int("MKV_LIST_BYTES", raw["list_bytes"], 1 << 10, 1 << 40),
                   admin_port=admin_port, admin_bind=raw["admin_bind"] or "127.0.0.1",
                   log_format=raw["log_format"])

    def placement(self, key: bytes) -> list:
        """The volumes (with their svXX folder) that should hold `key`, best first."""
        return key2volume(key, self.volumes, self.replicas, self.subvolumes)


def _parse_s3_keys(value):
    """MKV_S3_KEYS: comma-separated ACCESS_KEY:SECRET_KEY pairs -> {access: secret}."""
    keys = {}
    for pair in (p.strip() for p in (value or "").split(",")):
        if not pair:
            continue
        access, sep, secret = pair.partition(":")
        if not sep or not access or not secret:
            raise SettingsError("MKV_S3_KEYS: each entry is ACCESS_KEY:SECRET_KEY, comma-separated")
        if access in keys:
            raise SettingsError(f"MKV_S3_KEYS names the access key {access} twice")
        keys[access] = secret
    return keys


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """The S3 gateway's own settings (s3.py); the rest are Settings'."""
    keys: dict = dataclasses.field(default_factory=dict, repr=False)   # access key -> secret key
    region: str = "us-east-1"
    domain: str = None     # virtual-host style: a Host of 'bucket.DOMAIN' names the bucket
    volume_dirs: tuple = ()   # folders of volumes on this host, whose files GetObject reads itself

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        region = env.get("MKV_S3_REGION", "") or "us-east-1"
        if not re.fullmatch(r"[a-z0-9-]{1,40}", region):
            raise SettingsError(f"MKV_S3_REGION: {region!r} is not a region name (like us-east-1)")
        domain = env.get("MKV_S3_DOMAIN", "").strip().lower() or None
        if domain is not None and not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*", domain):
            raise SettingsError(f"MKV_S3_DOMAIN: {domain!r} is not a domain name (like s3.example.com)")
        dirs = tuple(d.strip() for d in env.get("MKV_S3_VOLUME_DIRS", "").split(",") if d.strip())
        for folder in dirs:
            if not os.path.isdir(folder):
                raise SettingsError(f"MKV_S3_VOLUME_DIRS: {folder!r} is not a folder")
        return cls(keys=_parse_s3_keys(env.get("MKV_S3_KEYS", "")), region=region, domain=domain,
                   volume_dirs=tuple(os.path.abspath(d) for d in dirs))
