"""The pool's client side: what engines link (through the connector)."""

from beluga.cxlpool.client.client import Lookup, PoolClient

__all__ = ["Lookup", "PoolClient"]
