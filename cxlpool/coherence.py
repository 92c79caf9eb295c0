"""How a process makes its pool writes visible to others and avoids reading stale lines.

CXL 2.0 memory shared by several hosts is not coherent: a host may keep a line in its cache long after
another host changed it in memory, and its own stores may sit in its cache. Three modes:

- `coherent`: one host (tmpfs) or hardware-coherent memory. Plain copies, ordering fences only.
- `native`: non-coherent CXL. Writers use non-temporal stores (data) or `clflushopt` + `sfence`
  (headers); readers `clflushopt` the range before reading it. Real instructions (see `native`).
- `simulated`: a per-process model of a cache that keeps every line it has seen, and every line it
  wrote, until flushed or invalidated. One host's memory is coherent, so only this mode can show that
  the protocol misses no flush: drop one step (`drop=`) and the multi-process tests fail.

All offsets are from the start of the region.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from beluga.cxlpool import native
from beluga.kernels import cpu as copy

LINE = native.CACHE_LINE
MODES = ("coherent", "native", "simulated")
# Steps of the protocol that a test may drop to prove that the others do not hide the bug.
STEPS = ("writer_flush", "header_flush", "reader_invalidate")


class Coherence:
    """Base: the coherent mode."""

    mode = "coherent"

    def __init__(self, mem: np.ndarray, drop: Iterable[str] = ()):
        self.mem = mem
        self.base = native.address(mem)
        self.drop = frozenset(drop)
        unknown = self.drop - set(STEPS)
        if unknown:
            raise ValueError(f"unknown protocol steps to drop: {sorted(unknown)}; known: {STEPS}")

    # -- data blocks (written once by one client, read by many) --------------------------------------
    def write_block(self, off: int, src_addr: int, nbytes: int) -> int:
        """Copy a block into the pool and make it visible; return its checksum."""
        c = copy.copy_checksum(self.base + off, src_addr, nbytes, 0)
        native.store_fence()
        return int(c)

    def read_block(self, off: int, dst_addr: int, nbytes: int) -> int:
        """Copy a block out of the pool (fresh from memory); return the checksum of what was read."""
        return int(copy.copy_checksum(dst_addr, self.base + off, nbytes, 0))

    def wrote_externally(self, off: int, nbytes: int) -> None:
        """A kernel wrote [off, off+n) with non-temporal stores (or a GPU did): order it."""
        native.store_fence()

    def before_external_read(self, off: int, nbytes: int) -> None:
        """A kernel is about to read [off, off+n) that another host may have written."""

    # -- small records (slot headers), written by the metadata server -------------------------------
    def write_record(self, off: int, data: bytes) -> None:
        self.mem[off:off + len(data)] = np.frombuffer(data, np.uint8)
        native.store_fence()

    def read_record(self, off: int, nbytes: int) -> bytes:
        return self.mem[off:off + nbytes].tobytes()


class NativeCoherence(Coherence):
    mode = "native"

    def write_block(self, off, src_addr, nbytes):
        c = copy.copy_nt_checksum(self.base + off, src_addr, nbytes, 0)
        if "writer_flush" not in self.drop:
            native.store_fence()
        return int(c)

    def read_block(self, off, dst_addr, nbytes):
        self.before_external_read(off, nbytes)
        return int(copy.copy_checksum(dst_addr, self.base + off, nbytes, 0))

    def before_external_read(self, off, nbytes):
        if "reader_invalidate" not in self.drop:
            native.invalidate_range(self.base + off, nbytes)

    def write_record(self, off, data):
        self.mem[off:off + len(data)] = np.frombuffer(data, np.uint8)
        if "header_flush" not in self.drop:
            native.flush_range(self.base + off, len(data))

    def read_record(self, off, nbytes):
        if "reader_invalidate" not in self.drop:
            native.invalidate_range(self.base + off, nbytes)
        return self.mem[off:off + nbytes].tobytes()


class SimulatedCoherence(Coherence):
    """A write-back cache that never evicts on its own: the worst case a protocol must survive."""

    mode = "simulated"

    def __init__(self, mem, drop=()):
        super().__init__(mem, drop)
        self.lines: dict[int, np.ndarray] = {}
        self.dirty: set[int] = set()

    def _span(self, off, nbytes):
        return range(off // LINE, (off + nbytes + LINE - 1) // LINE)

    def _load(self, off, nbytes) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        for ln in self._span(off, nbytes):
            line = self.lines.get(ln)
            if line is None:
                line = self.mem[ln * LINE:(ln + 1) * LINE].copy()
                self.lines[ln] = line
            lo, hi = max(ln * LINE, off), min((ln + 1) * LINE, off + nbytes)
            out[lo - off:hi - off] = line[lo - ln * LINE:hi - ln * LINE]
        return out

    def _store(self, off, data: np.ndarray) -> None:
        for ln in self._span(off, data.size):
            line = self.lines.get(ln)
            if line is None:
                line = self.mem[ln * LINE:(ln + 1) * LINE].copy()
                self.lines[ln] = line
            lo, hi = max(ln * LINE, off), min((ln + 1) * LINE, off + data.size)
            line[lo - ln * LINE:hi - ln * LINE] = data[lo - off:hi - off]
            self.dirty.add(ln)

    def flush(self, off, nbytes) -> None:
        """clflushopt: write back dirty lines and drop them from this process's cache."""
        for ln in self._span(off, nbytes):
            line = self.lines.pop(ln, None)
            if line is not None and ln in self.dirty:
                self.mem[ln * LINE:(ln + 1) * LINE] = line
            self.dirty.discard(ln)

    def write_block(self, off, src_addr, nbytes):
        src = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(src_addr))
        self._store(off, src)
        if "writer_flush" not in self.drop:
            self.flush(off, nbytes)
        return int(copy.checksum(src_addr, nbytes))

    def read_block(self, off, dst_addr, nbytes):
        self.before_external_read(off, nbytes)
        data = self._load(off, nbytes)
        dst = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(dst_addr))
        dst[:] = data
        return int(copy.checksum(dst_addr, nbytes))

    def wrote_externally(self, off, nbytes):
        # Non-temporal stores bypass and invalidate this process's copies.
        for ln in self._span(off, nbytes):
            self.lines.pop(ln, None)
            self.dirty.discard(ln)

    def before_external_read(self, off, nbytes):
        if "reader_invalidate" not in self.drop:
            self.flush(off, nbytes)

    def write_record(self, off, data):
        self._store(off, np.frombuffer(data, np.uint8))
        if "header_flush" not in self.drop:
            self.flush(off, len(data))

    def read_record(self, off, nbytes):
        if "reader_invalidate" not in self.drop:
            self.flush(off, nbytes)
        return self._load(off, nbytes).tobytes()


def make(mode: str, mem: np.ndarray, drop: Iterable[str] = ()) -> Coherence:
    classes = {"coherent": Coherence, "native": NativeCoherence, "simulated": SimulatedCoherence}
    if mode not in classes:
        raise ValueError(f"unknown coherence mode {mode!r}; use one of {MODES}")
    return classes[mode](mem, drop)
