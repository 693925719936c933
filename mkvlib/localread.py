"""A gateway on a volume's host reads that volume's files from its folder
(MKV_S3_VOLUME_DIRS), so that GetObject sends a file as nginx does, by
sendfile(2) from the page cache, with no second hop over a socket.

A folder serves a volume only while it is that volume's disk: its `.id`
(the identity the volume made, volume/__main__.py) is the one the volume
answers (GET /.id), asked again every REMAP seconds, and the folder's
device and inode are those seen then. The file is opened before the
gateway checks the index record again (mkvlib.objects.Objects.open), as
nginx holds a file open once it answers: a replace renames the next value
over the path, and the open file stays the old one, whole.

A file that cannot be opened for another reason than its absence (no
permission, say) is read through the volume's HTTP as before."""
import os
import time

from mkvlib.errors import VolumeError
from mkvlib.placement import ID_PATH, volume_host

REMAP = 30.0        # seconds between two looks at which folder is which volume's disk


class LocalFile:
    """A file (or a part of it) opened on a local volume: like a
    volumes.Download (length, stream(n), close()) and, for sendfile, its
    descriptor and where the part starts."""
    relayable = False

    def __init__(self, fd, offset, length):
        self.fd, self.offset, self.length = fd, offset, length

    def stream(self, n):
        """The bytes, at most n at a time. VolumeError if the file cannot be read to the end."""
        at, end = self.offset, self.offset + self.length
        while at < end:
            try:
                piece = os.pread(self.fd, min(n, end - at), at)
            except OSError as e:
                raise VolumeError(f"reading a file of a local volume failed: {e.strerror}") from None
            if not piece:
                raise VolumeError(f"a file of a local volume ended {end - at} bytes early")
            at += len(piece)
            yield piece

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalVolumes:
    """Which volume's disk each folder of MKV_S3_VOLUME_DIRS is, and opening files there."""

    def __init__(self, dirs, volumes, hosts):
        self.dirs, self.volumes, self.hosts = tuple(dirs), volumes, tuple(hosts)
        self.mapped, self.at = {}, None     # host -> (folder, (st_dev, st_ino)); when mapped

    def folder_of(self, host):
        """The folder of `host`'s disk, if it is one of ours (and still the same disk), else None."""
        now = time.monotonic()
        if self.at is None or now - self.at >= REMAP:
            self.mapped, self.at = self.map(), now
        found = self.mapped.get(host)
        if found is None:
            return None
        folder, seen = found
        try:
            st = os.stat(folder)
        except OSError:
            return None
        return folder if (st.st_dev, st.st_ino) == seen else None

    def map(self):
        """{host: (folder, (st_dev, st_ino))} of the folders whose .id a volume answers."""
        ours = {}
        for folder in self.dirs:
            try:
                with open(os.path.join(folder, ID_PATH.lstrip("/"))) as f:
                    ident = f.read().strip()
                st = os.stat(folder)
            except OSError:
                continue
            if ident:
                ours[ident] = (folder, (st.st_dev, st.st_ino))
        answers = self.volumes.identities(self.hosts, mark=False) if ours else []
        return {host: ours[ident] for host, ident in zip(self.hosts, answers)
                if isinstance(ident, str) and ident in ours}

    def open(self, volume, path, rng=None):
        """A LocalFile of `path` in `volume` (bytes rng=(first, last) of it);
        False if the volume's disk is here and the file is not on it; None
        if the file is to be read over HTTP (not our disk, no permission)."""
        host = volume_host(volume)
        folder = self.folder_of(host)
        if folder is None:
            return None
        try:   # the volume's svXX folder, then the key's path: as nginx finds it
            fd = os.open(folder + volume[len(host):] + path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        size = os.fstat(fd).st_size
        if rng is None:
            return LocalFile(fd, 0, size)
        first, last = rng
        return LocalFile(fd, first, max(0, min(last, size - 1) - first + 1))
