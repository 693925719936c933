"""The core's exception kinds. Each carries a one-line reason for a client;
mkv.py maps each class (the nearest in its hierarchy) to one HTTP status."""


class MkvError(Exception):
    """Base of every error the core reports to a client."""


class SettingsError(MkvError):
    """A MKV_* setting (or a tool's flag) is wrong, or the index cannot be opened."""


class BadKey(MkvError):
    """The key cannot be stored (it must start with '/' and fit a file name)."""


class KeyTooLong(BadKey):
    """The key's file name would be longer than a volume's filesystem takes."""


class KeyMissing(MkvError):
    """No live record of the key."""


class KeyExists(MkvError):
    """A PUT of a key that is live: mkv does not overwrite."""


class KeyProtected(MkvError):
    """A DELETE of a live key with MKV_PROTECT on."""


class KeyBusy(MkvError):
    """Another request holds the key's lock, or this one lost it."""


class EmptyValue(MkvError):
    """A PUT without a body."""


class ClientGone(MkvError):
    """The client stopped sending its body before its end."""


class VolumeError(MkvError):
    """A volume answered with an error, or not at all."""


class VolumeDown(VolumeError):
    """A volume could not be reached (refused, timed out, or known down)."""


class MoveUnknown(VolumeDown):
    """A volume did not answer a MOVE: the value may have landed there (it cannot land later)."""


class Unavailable(MkvError):
    """The key exists but no replica could be served."""


class DeleteIncomplete(MkvError):
    """A DELETE could not remove every replica; the key stays invisible."""


class Unauthorized(MkvError):
    """A write without MKV_SECRET."""


class IndexBusy(MkvError):
    """Another process held the index's write lock for longer than BUSY_TIMEOUT."""
