"""Where a key lives: its volumes and its paths, the original Go
minikeyvalue's on-disk format bit for bit; which keys a volume can store.
Pure functions: no I/O."""
import base64
import functools
import hashlib
import itertools
import os
from urllib.parse import quote

from mkvlib.errors import BadKey, KeyTooLong, SettingsError

NAME_MAX = 255             # longest file name a volume's filesystem takes
PATH_NAME_MAX = 2048       # longest base64 name with its '/' folders (PATH_MAX is 4096 with the volume's)
MAX_SUBVOLUMES = 256       # svXX: the subvolume folder name has two hex digits
TMP_DIR = "/.tmp/"         # on each volume: a value is uploaded here, then MOVEd into place
ID_PATH = "/.id"           # on each volume: its identity, made when its folder is first served


def key2path(key: bytes) -> str:
    """Path of a key's file inside a (sub)volume: /md5[0]/md5[1]/base64(key)."""
    digest = hashlib.md5(key).digest()
    return "/%02x/%02x/%s" % (digest[0], digest[1], base64.b64encode(key).decode("ascii"))


def path2key(name: str) -> bytes:
    """The key whose file is named `name` (the part after /xx/yy/); ValueError if none."""
    return base64.b64decode(name.encode("ascii"), validate=True)


def key2volume(key: bytes, volumes, replicas: int, subvolumes: int) -> list:
    """The volumes (with their svXX folder) that hold a key, best first.

    Each volume scores md5(key + volume); highest scores win. Adding a volume
    moves only the keys it now wins, and the order does not depend on the
    order of MKV_VOLUMES."""
    scored = []
    for v in volumes:
        scored.append((hashlib.md5(key + v.encode()).digest(), v))
    scored.sort(key=lambda sv: sv[0], reverse=True)   # stable, like Go's sort.Stable
    chosen = []
    for score, v in scored[:replicas]:
        if subvolumes == 1:
            chosen.append(v)
        else:
            # the low 32 bits of the score: a single byte would skew the spread
            chosen.append("%s/sv%02X" % (v, int.from_bytes(score[12:16], "big") % subvolumes))
    return chosen


@functools.lru_cache(maxsize=4096)   # a few volume names, asked many times per request
def volume_host(volume: str) -> str:
    """host:port of a volume string such as 'localhost:3001/sv08'."""
    return volume.split("/", 1)[0]


def disk_of(volume: str, ids: dict):
    """(disk, subvolume folder) that a volume name stands for: two names of
    one server ('localhost:3001', '127.0.0.1:3001') are one disk when `ids`
    ({host: identity}, the index's volume_ids) gives them one identity."""
    host = volume_host(volume)
    return ids.get(host) or host, volume[len(host):]


def named_twice(hosts, ids: dict):
    """Two of `hosts` that name one disk ({host: identity}: the same /.id),
    as a pair in their order; None if none do."""
    first = {}
    for host in hosts:
        ident = ids.get(host)
        if ident and ident in first:
            return first[ident], host
        first.setdefault(ident, host)
    return None


def check_named_once(hosts, ids: dict) -> None:
    """SettingsError if two of `hosts` (MKV_VOLUMES) name one disk."""
    twins = named_twice(hosts, ids)
    if twins:
        raise SettingsError(f"MKV_VOLUMES names one disk twice: {twins[0]} and {twins[1]} "
                            "(the same /.id); name each volume once")


def fallback_path(key: bytes) -> str:
    """The key as a path on MKV_FALLBACK that no client normalizes into
    another: a '.' or '..' segment goes as %2E, joined to its neighbours by
    %2F (no normalizer decodes %2F; the fallback decodes it back to '/').
    '/..%2f..%2fetc%2fpasswd' -> '/%2E%2E%2F%2E%2E%2Fetc/passwd'."""
    parts = quote(key, safe="/").split("/")
    dots = [p in (".", "..") for p in parts]
    out = parts[0]
    for i in range(1, len(parts)):
        out += "%2F" if i > 1 and (dots[i - 1] or dots[i]) else "/"
        out += parts[i].replace(".", "%2E") if dots[i] else parts[i]
    return out


def check_storable(key: bytes) -> None:
    """Raise BadKey if a key's file name cannot exist on a volume.

    base64 may contain '/', which nginx turns into folders: an empty path
    part ('//' or a trailing '/') cannot be stored, and no part may be longer
    than a file name can be."""
    if not key.startswith(b"/"):
        raise BadKey("a key starts with /")
    parts = base64.b64encode(key).split(b"/")
    if any(len(p) > NAME_MAX for p in parts) or sum(map(len, parts)) + len(parts) > PATH_NAME_MAX:
        raise KeyTooLong(f"key too long: its file name would pass {NAME_MAX} bytes "
                         f"(or {PATH_NAME_MAX} with its folders)")
    if not all(parts):
        raise BadKey("key cannot be stored: its base64 file name has an empty path part")


def new_tmp() -> str:
    """A name for one write's uploads under TMP_DIR; unique, so two writers never share one."""
    return unique_hex()


# this process's random prefix and counter for unique_hex (made again in a forked child)
_UNIQUE = []


def _new_unique_prefix():
    _UNIQUE[:] = [os.urandom(12).hex(), itertools.count()]


_new_unique_prefix()
os.register_at_fork(after_in_child=_new_unique_prefix)


def unique_hex() -> str:
    """32 hex digits that no other call returns: 96 random bits drawn once
    per process (a forked child draws its own), then a counter, so a
    name costs no system call (a uuid4 was one: getrandom)."""
    return "%s%08x" % (_UNIQUE[0], next(_UNIQUE[1]) & 0xFFFFFFFF)


def upload_name(tmp, volume):
    """Path of a write's upload on `volume`'s server: TMP_DIR + tmp, and the
    subvolume, so that two replicas on one server never share an upload."""
    return TMP_DIR + tmp + volume[len(volume_host(volume)):].replace("/", ".")
