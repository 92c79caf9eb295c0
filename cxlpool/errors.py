"""One exception tree for everything the pool can refuse or fail at.

A caller that only wants "use the pool if it works, compute otherwise" catches `PoolError`; the
subclasses say why, so a caller that can do better (retry later, drop one block, fix its configuration)
can tell the cases apart.
"""

from __future__ import annotations


class PoolError(RuntimeError):
    """Base of every error the pool raises."""


class PoolUnavailable(PoolError):
    """The metadata server did not answer in time, or cannot be reached. Compute instead of waiting."""


class PoolRefused(PoolError):
    """The server (or this client) refused a request: bad arguments, no session, wrong token, a second
    server on one pool, a reply that breaks the protocol. Nothing was changed by the refused request."""


class IntegrityError(PoolError):
    """A block read back is not the one asked for (key, generation or checksum differ): it is not used."""


class PoolFormatError(PoolError, ValueError):
    """The pool does not match what the caller expects (format, version, geometry, settings, owner)."""
