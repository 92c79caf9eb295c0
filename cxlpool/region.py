"""Mapping the pool's memory: a file on tmpfs/hugetlbfs, a device-DAX node, or several interleaved.

Every process maps the same bytes `MAP_SHARED`. Interleaving (several CXL devices, one logical pool)
is done in the virtual address space: a contiguous range is reserved, then each granule is mapped from
its device with `MAP_FIXED`, so the rest of the code sees one flat array.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beluga.cxlpool.errors import PoolFormatError

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

DAX_ALIGN = 2 * 1024 * 1024
DEFAULT_INTERLEAVE = 2 * 1024 * 1024


class RegionError(PoolFormatError):
    """The pool's memory cannot be created or mapped as asked."""


def kind_of(path: str) -> str:
    """'devdax' for /dev/dax*, 'file' otherwise."""
    return "devdax" if os.path.basename(path).startswith("dax") else "file"


def _dax_size(path: str) -> int | None:
    name = os.path.basename(path)
    sysfs = Path(f"/sys/bus/dax/devices/{name}/size")
    if sysfs.exists():
        return int(sysfs.read_text().strip())
    return None


def check_access(path: str, st: os.stat_result | None = None) -> None:
    """Refuse a pool file that others could have written: one readable or writable by every user, or
    owned by another user (unless shared with one of our groups, `--group-access`). Whoever can write the
    pool can hand every engine wrong KV. A device-DAX node is granted to pods by its device plugin."""
    st = st or os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o006:
        raise RegionError(
            f"{path} is open to every user (mode {mode:o}); any local user could read or corrupt cached KV. "
            f"Run `chmod o-rw {path}` and attach again")
    if st.st_uid != os.geteuid():
        shared = mode & 0o060 == 0o060 and st.st_gid in {os.getegid(), *os.getgroups()}
        if not shared:
            raise RegionError(
                f"{path} belongs to uid {st.st_uid}, not to this process (uid {os.geteuid()}), and is not "
                "shared with one of its groups; attach as its owner, or create the pool with --group-access")


@dataclass
class Region:
    """One logical byte range mapped shared. `mem` is a flat uint8 view over all of it."""

    paths: list[str]
    size: int
    interleave: int = DEFAULT_INTERLEAVE
    base: int = 0
    mem: np.ndarray = field(default=None, repr=False)
    _maps: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, paths: list[str] | str, size: int, mode: int = 0o600,
               interleave: int = DEFAULT_INTERLEAVE) -> Region:
        """Create (or resize) the backing files and map them. Device-DAX nodes are used as they are."""
        paths = [paths] if isinstance(paths, str) else list(paths)
        if size <= 0:
            raise RegionError(f"pool size must be positive, got {size}")
        if mode & 0o007:
            raise RegionError(f"pool mode {mode:o} gives access to other users; use 0600 or 0660")
        per = cls._per_region(paths, size, interleave)
        for p in paths:
            if kind_of(p) == "devdax":
                continue
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            try:
                # Never through a link, never over a file someone else prepared.
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            except FileExistsError:
                raise RegionError(f"{p} already exists; a pool is created only once. Remove it (`rm {p}`) "
                                  "if you mean to erase it, or attach to it") from None
            try:
                os.fchmod(fd, mode)
                os.ftruncate(fd, per)
            finally:
                os.close(fd)
        return cls.attach(paths, size, interleave)

    @staticmethod
    def _per_region(paths: list[str], size: int, interleave: int) -> int:
        if len(paths) == 1:
            return size
        if interleave <= 0 or interleave % mmap.PAGESIZE:
            raise RegionError(f"interleave granularity {interleave} must be a positive multiple of the page")
        if size % (interleave * len(paths)):
            raise RegionError(f"pool size {size} must be a multiple of interleave x regions "
                              f"({interleave} x {len(paths)})")
        return size // len(paths)

    @classmethod
    def attach(cls, paths: list[str] | str, size: int | None = None,
               interleave: int = DEFAULT_INTERLEAVE) -> Region:
        paths = [paths] if isinstance(paths, str) else list(paths)
        if not paths:
            raise RegionError("no pool path given")
        sizes = []
        for p in paths:
            if not os.path.exists(p):
                raise RegionError(f"pool {p} does not exist; create it with `beluga pool create --path {p}`")
            if os.path.islink(p):
                raise RegionError(f"{p} is a symbolic link; give the pool's own path")
            s = _dax_size(p) if kind_of(p) == "devdax" else None
            sizes.append(s if s is not None else os.path.getsize(p))
        if size is None:
            size = min(sizes) * len(paths)
        per = cls._per_region(paths, size, interleave)
        for p, s in zip(paths, sizes, strict=True):
            if s < per:
                raise RegionError(f"{p} has {s} bytes, the pool needs {per}")
            if kind_of(p) == "devdax" and per % DAX_ALIGN:
                raise RegionError(f"device-DAX mappings must be multiples of {DAX_ALIGN} bytes; got {per}")
        region = cls(paths=paths, size=size, interleave=interleave)
        region._map()
        return region

    def _map(self) -> None:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        fds = []
        try:
            for p in self.paths:
                try:
                    fds.append(os.open(p, os.O_RDWR | os.O_NOFOLLOW))
                except OSError as e:
                    raise RegionError(f"cannot open the pool {p}: {e.strerror}") from None
                check_access(p, os.fstat(fds[-1]))  # the file we map, not whatever the path named before
            if len(fds) == 1:
                addr = _libc.mmap(None, self.size, prot, mmap.MAP_SHARED, fds[0], 0)
                if addr in (None, _MAP_FAILED):
                    raise RegionError(f"mmap of {self.paths[0]} failed: {os.strerror(ctypes.get_errno())}")
                self._maps.append((addr, self.size))
            else:
                addr = _libc.mmap(None, self.size, 0,  # PROT_NONE: reserved, not accessible until mapped
                                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
                if addr in (None, _MAP_FAILED):
                    raise RegionError("could not reserve address space for the interleaved pool")
                self._maps.append((addr, self.size))
                g, n = self.interleave, len(fds)
                for i in range(self.size // g):
                    r, off = i % n, (i // n) * g
                    got = _libc.mmap(addr + i * g, g, prot, mmap.MAP_SHARED | _MAP_FIXED, fds[r], off)
                    if got != addr + i * g:
                        raise RegionError(f"interleaved mmap failed at granule {i}: "
                                          f"{os.strerror(ctypes.get_errno())} (vm.max_map_count?)")
        finally:
            for fd in fds:
                os.close(fd)
        self.base = addr
        self.mem = np.ctypeslib.as_array((ctypes.c_uint8 * self.size).from_address(addr))
        log.debug("mapped %s (%d bytes) at %#x", self.paths, self.size, addr)

    def populate(self, offset: int, length: int) -> None:
        """Fault [offset, offset+length) into this process's page tables now (allocating backing pages that
        do not exist yet), so that copies into and out of slots later take no page faults: on a fresh
        mapping, faults cost more than the copy itself (about 1 us per 4 KB page)."""
        start = (self.base + offset) & ~(mmap.PAGESIZE - 1)
        end = self.base + offset + length
        if _libc.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE not available (%s); pages fault in on first use",
                      os.strerror(ctypes.get_errno()))

    def close(self) -> None:
        self.mem = None
        for addr, n in self._maps:
            _libc.munmap(addr, n)
        self._maps.clear()
