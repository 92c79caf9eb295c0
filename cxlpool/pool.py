"""Creating and attaching a pool: region + superblock, checked against what the caller expects."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from beluga.cxlpool.layout import (
    Geometry,
    KVFormat,
    PoolFormatError,
    check_format,
    read_superblock,
    write_superblock,
)
from beluga.cxlpool.region import DAX_ALIGN, Region, kind_of
from beluga.cxlpool.settings import PoolSettings

log = logging.getLogger(__name__)


@dataclass
class Pool:
    region: Region
    fmt: KVFormat
    geo: Geometry

    @property
    def mem(self) -> np.ndarray:
        return self.region.mem

    def slot_offset(self, slot: int) -> int:
        return self.geo.data_off + slot * self.geo.slot_bytes

    def close(self) -> None:
        self.region.close()


def create(settings: PoolSettings, fmt: KVFormat) -> Pool:
    """Create and format a pool (a fresh one: every block that was in it is gone)."""
    dax = any(kind_of(p) == "devdax" for p in settings.path)
    geo = Geometry.plan(fmt, settings.size, settings.clients, align=DAX_ALIGN if dax else 4096)
    region = Region.create(settings.path, settings.size, 0o660 if settings.group_access else 0o600,
                           settings.interleave)
    region.mem[:8] = 0  # unformatted until the superblock is complete
    region.mem[4096:geo.data_off] = 0  # server status, RPC slots and headers start clean
    write_superblock(region.mem, fmt, geo)
    log.info("created pool %s: %d slots of %d bytes", settings.path, geo.n_slots, geo.slot_bytes)
    return Pool(region, fmt, geo)


def attach(settings: PoolSettings, expect: KVFormat | None = None, data: bool = True) -> Pool:
    """Map an existing pool; refuse it if its format is not `expect` (when given). `data`: this process
    copies blocks (not just metadata), so the data area is faulted in now (`settings.populate`)."""
    region = Region.attach(settings.path, None, settings.interleave)
    try:
        fmt, geo = read_superblock(region.mem)
        if expect is not None:
            check_format(fmt, expect)
    except PoolFormatError:
        region.close()
        raise
    if data and settings.populate:
        region.populate(geo.data_off, region.size - geo.data_off)
    return Pool(region, fmt, geo)


def open_or_create(settings: PoolSettings, fmt: KVFormat, data: bool = True) -> Pool:
    """Attach if the pool exists (it must have this format), create it if it does not."""
    if all(os.path.exists(p) for p in settings.path):
        return attach(settings, fmt, data)
    return create(settings, fmt)
