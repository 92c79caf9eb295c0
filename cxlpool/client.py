"""The client API that engines (through the connector) use.

    client = PoolClient(settings, expect=fmt)
    hit = client.lookup(keys)                # longest cached prefix, leased
    client.read_into(hit.slots[i], hit.gens[i], out)   # verified copy out
    client.release(hit.slots)
    slots = client.alloc(keys)               # room for new blocks
    csum = client.write(slot, data); client.commit([(slot, gen, csum)])

Data never goes through the server: clients copy blocks straight into and out of slots (or hand slot
addresses to a kernel) and the server only publishes and indexes them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from beluga.cxlpool import coherence, native
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.layout import COMMITTED, HEADER_BYTES, KEY_BYTES, RPC_PAYLOAD, SLOT_HEADER, KVFormat
from beluga.cxlpool.rpc import Op, PoolUnavailable, ShmTransport, TcpTransport, doorbell_path
from beluga.cxlpool.settings import PoolSettings

log = logging.getLogger(__name__)
MAX_KEYS = RPC_PAYLOAD // KEY_BYTES


class IntegrityError(RuntimeError):
    """A block read back does not match its committed checksum or generation: it is not used."""


@dataclass
class Lookup:
    slots: list[int]
    gens: list[int]

    def __len__(self) -> int:
        return len(self.slots)


class PoolClient:
    def __init__(self, settings: PoolSettings | None = None, expect: KVFormat | None = None):
        self.settings = settings or PoolSettings()
        self.pool = pool_mod.attach(self.settings, expect)
        self.fmt, self.geo = self.pool.fmt, self.pool.geo
        self.mem = self.pool.mem
        self.base = native.address(self.mem)
        self.coh = coherence.make(self.settings.coherence, self.mem, self.settings.test_drop)
        if self.settings.transport == "tcp":
            self.rpc = TcpTransport(self.settings.tcp_host, self.settings.tcp_port, self.settings.rpc_timeout_s)
        else:
            self.rpc = ShmTransport(self.mem, self.geo, doorbell_path(self.settings.path[0]),
                                    self.settings.rpc_timeout_s)

    # -- addresses (zero-copy access for kernels) -----------------------------------------------------
    def slot_offset(self, slot: int) -> int:
        return self.geo.data_off + slot * self.geo.slot_bytes

    def slot_addr(self, slot: int) -> int:
        return self.base + self.slot_offset(slot)

    def slot_view(self, slot: int) -> np.ndarray:
        off = self.slot_offset(slot)
        return self.mem[off: off + self.fmt.block_bytes]

    # -- metadata calls -------------------------------------------------------------------------------
    def _call(self, op: Op, n=0, args=(0, 0, 0, 0), payload=b""):
        reply = self.rpc.call(op, n, args, payload)
        if reply.status != 0:
            raise RuntimeError(f"pool server refused {op.name}: {reply.payload.decode(errors='replace')}")
        return reply

    def hello(self) -> dict:
        r = self._call(Op.HELLO)
        return {"slots": r.ret[0], "server_pid": r.ret[1]}

    def lookup(self, keys: list[bytes], lease: bool = True) -> Lookup:
        """The longest run of `keys` (from the first) that the pool holds; leased unless lease=False."""
        out = Lookup([], [])
        for i in range(0, len(keys), MAX_KEYS):
            chunk = keys[i:i + MAX_KEYS]
            r = self._call(Op.LOOKUP, len(chunk), (int(lease), 0, 0, 0), _pack_keys(chunk))
            p = memoryview(r.payload).cast("I")
            out.slots += p[: r.n].tolist()
            out.gens += p[r.n: 2 * r.n].tolist()
            if r.n < len(chunk):
                break
        return out

    def alloc(self, keys: list[bytes]) -> list[tuple[int, int]]:
        """(slot, gen) per key; slot -1 when the pool has no room, -2 when the block is already stored."""
        out = []
        for i in range(0, len(keys), MAX_KEYS):
            chunk = keys[i:i + MAX_KEYS]
            r = self._call(Op.ALLOC, len(chunk), payload=_pack_keys(chunk))
            slots = np.frombuffer(r.payload, np.int64, len(chunk))
            gens = np.frombuffer(r.payload, np.uint32, len(chunk), offset=8 * len(chunk))
            out += list(zip(slots.tolist(), gens.tolist(), strict=True))
        return out

    def commit(self, entries: list[tuple[int, int, int]]) -> int:
        """Publish written slots: (slot, gen, checksum). Returns how many the server accepted."""
        done = 0
        dt = np.dtype([("slot", "<u4"), ("gen", "<u4"), ("csum", "<u8")])
        for i in range(0, len(entries), RPC_PAYLOAD // 16):
            chunk = entries[i:i + RPC_PAYLOAD // 16]
            rec = np.array(chunk, dt)
            done += self._call(Op.COMMIT, len(chunk), (self.fmt.block_bytes, 0, 0, 0), rec.tobytes()).ret[0]
        return done

    def abort(self, entries: list[tuple[int, int]]) -> None:
        self._pairs(Op.ABORT, entries)

    def report_bad(self, entries: list[tuple[int, int]]) -> None:
        self._pairs(Op.BAD, entries)

    def _pairs(self, op: Op, entries) -> None:
        for i in range(0, len(entries), RPC_PAYLOAD // 8):
            chunk = entries[i:i + RPC_PAYLOAD // 8]
            self._call(op, len(chunk), payload=np.asarray(chunk, np.uint32).reshape(-1, 2).tobytes())

    def release(self, slots: list[int]) -> None:
        for i in range(0, len(slots), RPC_PAYLOAD // 4):
            chunk = slots[i:i + RPC_PAYLOAD // 4]
            self._call(Op.RELEASE, len(chunk), payload=np.asarray(chunk, np.uint32).tobytes())

    def stats(self) -> dict:
        return json.loads(self._call(Op.STATS).payload)

    # -- data -----------------------------------------------------------------------------------------
    def write(self, slot: int, data: np.ndarray) -> int:
        """Copy one block into an allocated slot and make it visible; returns its checksum."""
        data = np.ascontiguousarray(data)
        if data.nbytes != self.fmt.block_bytes:
            raise ValueError(f"block has {data.nbytes} bytes, the pool's format needs {self.fmt.block_bytes}")
        return self.coh.write_block(self.slot_offset(slot), native.address(data), data.nbytes)

    def header(self, slot: int) -> np.void:
        raw = self.coh.read_record(self.geo.hdr_off + slot * HEADER_BYTES, SLOT_HEADER.itemsize)
        return np.frombuffer(raw, SLOT_HEADER)[0]

    def expected(self, slot: int, gen: int) -> int:
        """The committed checksum of a leased slot; IntegrityError if it is not that block anymore."""
        h = self.header(slot)
        if int(h["state"]) != COMMITTED or int(h["gen"]) != gen:
            raise IntegrityError(f"slot {slot} changed under its lease (gen {int(h['gen'])} != {gen})")
        return int(h["checksum"])

    def verify(self, slot: int, gen: int, got: int) -> None:
        if got != self.expected(slot, gen):
            self.report_bad([(slot, gen)])
            raise IntegrityError(f"slot {slot} gen {gen}: checksum mismatch; the block is dropped")

    def read_into(self, slot: int, gen: int, out: np.ndarray) -> None:
        """Copy one leased block out of the pool, verified against its header."""
        if not out.flags.c_contiguous or out.nbytes != self.fmt.block_bytes:
            raise ValueError("output must be a contiguous buffer of exactly one block")
        expected = self.expected(slot, gen)
        got = self.coh.read_block(self.slot_offset(slot), native.address(out), out.nbytes)
        if got != expected:
            self.report_bad([(slot, gen)])
            raise IntegrityError(f"slot {slot} gen {gen}: checksum mismatch; the block is dropped")

    # -- conveniences ---------------------------------------------------------------------------------
    def put(self, keys: list[bytes], blocks: list[np.ndarray]) -> int:
        """Store blocks under keys (skipping those already stored). Returns how many were committed."""
        entries = []
        for (slot, gen), data in zip(self.alloc(keys), blocks, strict=True):
            if slot >= 0:
                entries.append((slot, gen, self.write(slot, data)))
        return self.commit(entries) if entries else 0

    def get(self, keys: list[bytes]) -> list[np.ndarray]:
        """Read back the longest stored prefix of keys as arrays (verified)."""
        hit = self.lookup(keys)
        try:
            out = []
            for s, g in zip(hit.slots, hit.gens, strict=True):
                buf = np.empty(self.fmt.block_bytes, np.uint8)
                self.read_into(s, g, buf)
                out.append(buf)
            return out
        finally:
            if hit.slots:
                self.release(hit.slots)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the metadata server answers (used right after starting one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.hello()
                return
            except PoolUnavailable:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        try:
            self.rpc.close()
        finally:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pack_keys(keys: list[bytes]) -> bytes:
    packed = b"".join(keys)
    # The total and the shortest length together prove every key has the right length, in C loops.
    if keys and (len(packed) != KEY_BYTES * len(keys) or min(map(len, keys)) != KEY_BYTES):
        bad = next(len(k) for k in keys if len(k) != KEY_BYTES)
        raise ValueError(f"block keys are {KEY_BYTES} bytes (sha256), got {bad}")
    return packed
