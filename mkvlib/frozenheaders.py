"""A WSGI header list that cannot change once made.

An app that answers many requests with the very same headers (the master's
302 to a hot key, its 404) can hand start_response the same list each time;
a server may then check and format it once and keep what it made on the list
(server_form, the server's own to set and read: worker.PlainResponse keeps
its checked, formatted head there).

PEP 3333 asks for the headers as a list of type list, and a strict checker
(wsgiref.validate, which Falcon's test client runs) refuses a subclass: an
app hands one only to a server whose environ says it takes one (TAKEN), and a
plain list to any other."""

TAKEN = "mkv.frozen_headers"     # environ key: True if this server's start_response takes a FrozenHeaders


def _refuse(self, *args, **kwargs):
    raise TypeError("a FrozenHeaders list cannot change once made")


class FrozenHeaders(list):
    """[(name, value), ...], fixed at creation."""

    server_form = None

    def __init__(self, pairs=()):
        if self or self.server_form is not None:
            _refuse(self)      # list.__init__ again would refill it
        super().__init__(pairs)

    # every way a list changes in place
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __reduce_ex__(self, protocol):
        return (FrozenHeaders, (list(self),))    # a copy is a new list, its server form its own
