"""Large copies through the copy engine: the kernel packs blocks in a small device buffer, the copy
engine moves them between that buffer and the pool in pieces as large as a block.

Why: on an H200 (PCIe Gen5), every way an SM can reach host memory -- 16-byte loads and stores, loads
with a 256-byte L2 prefetch hint, TMA bulk copies through shared memory -- topped out at 95 % of the copy
engine's rate device-to-host and 93 % host-to-device (`BENCHMARKS.md`, the PCIe probe). The copy engine
also leaves the SMs to the forward pass that a layer-by-layer load overlaps with. The pool is still
written in place: the buffer is on the device, and what crosses PCIe goes straight into the slots.

Two halves of the buffer alternate, so the kernel fills (or drains) one while the copy engine works on
the other: the kernels run on the caller's stream (ordered with the engine's own work), the copies on a
side stream, and events order each half's reuse. A copy that fits one half runs on the caller's stream
alone. A gather's first chunk goes straight to the pool through the direct kernel, on the side stream,
while the second is packed: otherwise the link would wait for the kernel to fill the first half. The
checksums are the kernel's, taken in device memory, so both paths return the same ones.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

HALF = 32 << 20  # bytes in each half of the device buffer (at least one block's span)
MIN_SPAN = 256 << 10  # smaller pieces cost the copy engine more per byte than the direct path
MIN_BYTES = 64 << 20  # below this the pipeline's fill and drain cost more than the copy engine gains


def worth_it(n: int, span: int) -> bool:
    """Whether "auto" stages a copy of n blocks of `span` bytes (measured on an H200: `BENCHMARKS.md`)."""
    return span >= MIN_SPAN and n * span >= MIN_BYTES


class Staging:
    """The device buffer, the side stream and the events of one cache layout, and the chunking of each
    batch size seen (made once: the first copy waits on everything computed before it)."""

    def __init__(self, drv, half: int):
        self.half = half
        self._keep, base = drv.alloc(2 * half)
        self.bases = (base, base + half)
        self.side = drv.stream()
        self.ready = (drv.event(), drv.event())  # half h filled (gather: by the kernel; scatter: by the copies)
        self.free = (drv.event(), drv.event())  # half h drained, may be filled again
        self._plans: dict[tuple[int, int], tuple[list[tuple[int, int]], np.ndarray]] = {}

    def plan(self, n: int, span: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The chunks ([first, end) blocks) and each block's address in the buffer."""
        p = self._plans.get((n, span))
        if p is None:
            if len(self._plans) > 1024:
                self._plans.clear()
            chunks = _chunks(n, self.half // span)
            at = np.empty(n, np.int64)
            for c, (c0, c1) in enumerate(chunks):
                at[c0:c1] = self.bases[c % 2] + np.arange(c1 - c0, dtype=np.int64) * span
            p = self._plans[(n, span)] = (chunks, at)
        return p


def buffer(launcher) -> Staging | None:
    """The layout's device buffer, made on first use (two halves of `HALF` bytes, or of one block if that
    is more). None if the device has no memory for it: logged once, and "auto" then keeps to the direct
    path rather than failing the engine's copies."""
    if launcher.staging is None and launcher.staging_error is None:
        half = max(HALF, launcher.span(0, launcher.layers)[1])
        try:
            launcher.staging = Staging(launcher.driver, half)
        except Exception as e:  # noqa: BLE001 -- numba's CUDA errors, out of memory above all
            launcher.staging_error = str(e)
            log.warning("no device memory for the %.1f MB copy buffer (%s): large copies take the direct "
                        "path (up to ~5 %% slower)", 2 * half / 1e6, e)
    return launcher.staging


def _chunks(n: int, per: int) -> list[tuple[int, int]]:
    """[first, end) blocks of each chunk: at most `per` blocks, the first and last chunks smaller (doubling
    from an eighth of a half), so that the one copy that cannot overlap -- the kernel before the first
    copy engine transfer of a gather, after the last one of a scatter -- is short."""
    sizes, k = [], max(1, per // 8)
    while k < per and 2 * sum(sizes) + 2 * k < n:
        sizes.append(k)
        k *= 2
    middle, rest = divmod(n - 2 * sum(sizes), per)
    mid = [per] * middle + ([rest] if rest else [])
    bounds = np.cumsum([0] + sizes + mid + sizes[::-1])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _copies(pool: np.ndarray, c0: int, c1: int, span: int):
    """(first block, count) of each run of blocks in [c0, c1) whose pool spans follow each other in
    memory: one copy each."""
    breaks = (np.flatnonzero(np.diff(pool[c0:c1]) != span) + (c0 + 1)).tolist()
    return [(a, b - a) for a, b in zip([c0, *breaks], [*breaks, c1], strict=True)]


def staged(launcher, block_ids, slot_addrs, to_pool: bool, lo: int, hi: int, stream: int) -> np.ndarray:
    """Copy through the device buffer (see the module's docstring); returns per-block checksums.

    The time until the first copy-engine transfer starts is what this path loses against one plain copy,
    so everything not needed for it is done after it is queued."""
    drv = launcher.driver
    off, span = launcher.span(lo, hi)
    st = buffer(launcher)
    if st is None:
        raise RuntimeError(f"the staged path has no device buffer: {launcher.staging_error}")
    n = len(block_ids)
    chunks, at = st.plan(n, span)
    side = st.side if len(chunks) > 1 else stream
    pool = np.asarray(slot_addrs, np.int64) + off
    adjacent = n == 1 or bool((np.diff(pool) == span).all())  # the usual case: one copy a chunk

    def copy(c0: int, c1: int) -> None:
        for a, k in ((c0, c1 - c0),) if adjacent else _copies(pool, c0, c1, span):
            dst, src = (int(pool[a]), int(at[a])) if to_pool else (int(at[a]), int(pool[a]))
            drv.copy(dst, src, k * span, side)

    if not to_pool:
        copy(*chunks[0])  # a scatter's first transfer needs nothing else
    # A gather's first transfer would wait for the kernel to fill the buffer: instead the kernel writes the
    # first chunk straight into the pool (the direct path), on the side stream, while the second is staged.
    lead = chunks[0][1] if to_pool and len(chunks) > 1 else 0
    per_block = launcher.plan(1, lo, hi, whole_runs=True)[0]  # checksum partials of one block
    launcher.reserve(n, n * per_block)
    rows = at - off  # the kernel places layer lo at the slot's offset `off`
    rows[:lead] = pool[:lead] - off
    launcher.rows(block_ids, rows)
    launcher.upload_rows(n, stream)
    if lead:
        drv.record(st.ready[0], stream)
        drv.wait(side, st.ready[0])
        launcher.enqueue(0, lead, lo, hi, True, side, 0, mirrored=True)
        drv.record(st.free[0], side)
    for c, (c0, c1) in enumerate(chunks):
        h = c & 1
        if to_pool:
            if c == 0 and lead:
                continue
            if c >= 2:
                drv.wait(stream, st.free[h])
            launcher.enqueue(c0, c1 - c0, lo, hi, True, stream, c0 * per_block, mirrored=True)
            if side != stream:
                drv.record(st.ready[h], stream)
                drv.wait(side, st.ready[h])
            copy(c0, c1)
            if side != stream:
                drv.record(st.free[h], side)
        else:
            if c >= 2:
                drv.wait(side, st.free[h])
            if c > 0:
                copy(c0, c1)
            if side != stream:
                drv.record(st.ready[h], side)
                drv.wait(stream, st.ready[h])
            launcher.enqueue(c0, c1 - c0, lo, hi, False, stream, c0 * per_block, mirrored=True)
            if side != stream:
                drv.record(st.free[h], stream)
    if lead:
        drv.wait(stream, st.free[0])  # the first chunk's checksums are in before they are read back
    launcher.download_sums(n * per_block, stream)
    drv.sync(stream)
    if side != stream:
        drv.sync(side)
    return launcher.sums(0, n, n * per_block)
