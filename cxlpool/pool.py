"""Creating and attaching a pool: region + superblock, checked against what the caller expects.

The superblock says everything two processes must agree on (KV format, geometry, coherence mode,
transports), so every process reads it from there; an explicit setting that differs is refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass

import numpy as np

from beluga.cxlpool.errors import PoolFormatError, PoolRefused
from beluga.cxlpool.layout import (
    Geometry,
    KVFormat,
    Service,
    check_format,
    read_superblock,
    write_superblock,
)
from beluga.cxlpool.region import DAX_ALIGN, Region, RegionError, kind_of
from beluga.cxlpool.settings import PoolSettings

log = logging.getLogger(__name__)


@dataclass
class Pool:
    region: Region
    fmt: KVFormat
    geo: Geometry
    svc: Service

    @property
    def mem(self) -> np.ndarray:
        return self.region.mem

    def close(self) -> None:
        self.region.close()


def create(settings: PoolSettings, fmt: KVFormat) -> Pool:
    """Create and format a pool, and its token file if there is none yet (a Kubernetes Secret, say)."""
    dax = any(kind_of(p) == "devdax" for p in settings.path)
    geo = Geometry.plan(fmt, settings.size, settings.clients, align=DAX_ALIGN if dax else 4096)
    svc = Service(settings.coherence or "coherent", tuple(settings.transports or ("shm", "tcp")))
    mode = 0o660 if settings.group_access else 0o600
    region = Region.create(settings.path, settings.size, mode, settings.interleave)
    region.mem[:8] = 0  # unformatted until the superblock is complete
    region.mem[4096:geo.data_off] = 0  # server status, RPC slots and headers start clean
    write_superblock(region.mem, fmt, geo, svc)
    if "tcp" in svc.transports:
        make_token(settings.token_path(), mode & 0o640)
    log.info("created pool %s: %d slots of %d bytes, %s, serving %s", settings.path, geo.n_slots,
             geo.slot_bytes, svc.coherence, "+".join(svc.transports))
    return Pool(region, fmt, geo, svc)


def attach(settings: PoolSettings, expect: KVFormat | None = None, data: bool = True) -> Pool:
    """Map an existing pool; refuse it if its format is not `expect` (when given) or an explicit setting
    disagrees with the superblock. `data`: this process copies blocks (not just metadata), so the data
    area is faulted in now (`settings.populate`)."""
    region = Region.attach(settings.path, None, settings.interleave)
    try:
        fmt, geo, svc = read_superblock(region.mem)
        if expect is not None:
            check_format(fmt, expect)
        check_settings(settings, svc)
    except PoolFormatError:
        region.close()
        raise
    if data and settings.populate:
        region.populate(geo.data_off, region.size - geo.data_off)
    return Pool(region, fmt, geo, svc)


def check_settings(settings: PoolSettings, svc: Service) -> None:
    diffs = []
    if settings.coherence is not None and settings.coherence != svc.coherence:
        diffs.append(f"coherence: pool has {svc.coherence!r}, setting says {settings.coherence!r}")
    if settings.transports is not None and set(settings.transports) != set(svc.transports):
        diffs.append(f"transports: pool serves {'+'.join(svc.transports)}, setting says "
                     f"{'+'.join(settings.transports)}")
    if settings.transport is not None and settings.transport not in svc.transports:
        diffs.append(f"transport: pool serves {'+'.join(svc.transports)}, setting says {settings.transport!r}")
    if diffs:
        raise PoolFormatError("settings disagree with the pool (" + "; ".join(diffs) + "); drop the setting "
                              "to use the pool's, or create a new pool")


def open_or_create(settings: PoolSettings, fmt: KVFormat, data: bool = True) -> Pool:
    """Attach if the pool exists (it must have this format), create it if it does not."""
    if all(os.path.exists(p) for p in settings.path):
        return attach(settings, fmt, data)
    return create(settings, fmt)


# -- the pool token (TCP RPC) ---------------------------------------------------------------------------------
def make_token(path: str, mode: int = 0o600) -> None:
    """Write a fresh random token unless one exists (then check it is private)."""
    if os.path.lexists(path):
        read_token(path)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    log.info("wrote the pool token to %s (mode %o): give it to every engine that calls over TCP", path, mode)


def read_token(path: str) -> bytes:
    """The pool token's bytes; refused if missing, empty or readable by every user (fail closed)."""
    try:
        fd = os.open(path, os.O_RDONLY)  # Kubernetes mounts a Secret's keys as links: follow them
    except OSError as e:
        raise PoolRefused(f"cannot read the pool token {path}: {e.strerror}. `beluga pool create` writes it; "
                          "mount it where the engines and the server look (token_file)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_IMODE(st.st_mode) & 0o007:
            raise PoolRefused(f"the pool token {path} is readable by every user; `chmod o-rwx {path}`")
        token = f.read().strip()
    if len(token) < 16:
        raise PoolRefused(f"the pool token {path} holds {len(token)} bytes; it needs at least 16 (random)")
    return token


__all__ = ["Pool", "RegionError", "attach", "create", "make_token", "open_or_create", "read_token"]
