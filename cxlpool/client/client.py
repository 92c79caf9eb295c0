"""The client API that engines (through the connector) use.

    client = PoolClient(settings, expect=fmt)
    hit = client.lookup(keys)                # longest cached prefix, leased
    client.read_into(hit.slots[i], hit.gens[i], keys[i], out)   # verified copy out
    client.release(hit.slots)
    slots = client.alloc(keys)               # room for new blocks
    csum = client.write(slot, data); client.commit([(slot, gen, csum, key)])

Data never goes through the server: clients copy blocks straight into and out of slots (or hand slot
addresses to a kernel) and the server only publishes and indexes them.

What a reader checks before it uses a block: the slot's header says COMMITTED, under the key it asked for,
with the generation its lease named, and the checksum of the bytes it copied equals the header's. The
client also checks every reply (counts, slot numbers) so that no server, however broken, makes it read
or write outside the pool. A background thread keeps the session's heartbeat.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from beluga.cxlpool import coherence, native
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.client.transport import ShmTransport, TcpTransport
from beluga.cxlpool.errors import IntegrityError, PoolError, PoolRefused, PoolUnavailable
from beluga.cxlpool.layout import COMMITTED, HEADER_BYTES, SLOT_HEADER, KVFormat
from beluga.cxlpool.protocol import (
    ALLOC_EXISTS,
    ALLOC_NO_ROOM,
    COMMIT_REC,
    KEY_BYTES,
    MAX_N,
    PAIR_REC,
    Op,
    Status,
    doorbell_path,
)
from beluga.cxlpool.settings import PoolSettings

log = logging.getLogger(__name__)


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
        s = self.settings
        self.coh = coherence.make(self.pool.svc.coherence, self.mem, s.test_drop)
        self.transport = s.transport or ("shm" if "shm" in self.pool.svc.transports else "tcp")
        if self.transport == "tcp":
            self.rpc = TcpTransport(s.tcp_host, s.tcp_port, pool_mod.read_token(s.token_path()), s.rpc_timeout_s)
        else:
            self.rpc = ShmTransport(self.mem, self.geo, doorbell_path(s.path[0]), s.rpc_timeout_s)
        self._stop = threading.Event()
        threading.Thread(target=_beat, args=(weakref.ref(self.rpc), self._stop, s.heartbeat_timeout_s / 4),
                         name="beluga-pool-heartbeat", daemon=True).start()

    # -- addresses (zero-copy access for kernels) -----------------------------------------------------
    def slot_offset(self, slot: int) -> int:
        if not 0 <= slot < self.geo.n_slots:
            raise PoolRefused(f"slot {slot} is outside the pool's {self.geo.n_slots}")
        return self.geo.data_off + slot * self.geo.slot_bytes

    def slot_addr(self, slot: int) -> int:
        return self.base + self.slot_offset(slot)

    def slot_view(self, slot: int) -> np.ndarray:
        off = self.slot_offset(slot)
        return self.mem[off: off + self.fmt.block_bytes]

    # -- metadata calls -------------------------------------------------------------------------------
    def _call(self, op: Op, n=0, args=(0, 0, 0, 0), payload=b""):
        reply = self.rpc.call(op, n, args, payload)
        if reply.status == Status.EXPIRED:  # reaped, or a new server: a new session, and the call once more
            self.rpc.hello()
            reply = self.rpc.call(op, n, args, payload)
        if reply.status != Status.OK:
            raise PoolRefused(f"pool server refused {op.name}: {reply.payload.decode(errors='replace')}")
        return reply

    def hello(self) -> dict:
        """Open a new session (the old one, and whatever it held, ends)."""
        self.rpc.hello()
        return {"slots": self.geo.n_slots, "token": self.rpc.token}

    def ping(self) -> None:
        """One empty round trip."""
        self._call(Op.PING)

    def _refuse(self, op: Op, what: str):
        raise PoolRefused(f"the server's {op.name} reply is malformed ({what}); not used")

    def lookup(self, keys: list[bytes], lease: bool = True) -> Lookup:
        """The longest run of `keys` (from the first) that the pool holds; leased unless lease=False.
        All or nothing: if a later chunk fails, the leases of the earlier ones are given back."""
        out = Lookup([], [])
        step = MAX_N[Op.LOOKUP]
        try:
            for i in range(0, len(keys), step):
                chunk = keys[i:i + step]
                r = self._call(Op.LOOKUP, len(chunk), (int(lease), 0, 0, 0), _pack_keys(chunk))
                if r.n > len(chunk) or len(r.payload) != 8 * r.n:
                    self._refuse(Op.LOOKUP, f"{r.n} hits for {len(chunk)} keys")
                p = np.frombuffer(r.payload, np.uint32)
                if r.n and int(p[: r.n].max()) >= self.geo.n_slots:
                    self._refuse(Op.LOOKUP, "a slot outside the pool")
                out.slots += p[: r.n].tolist()
                out.gens += p[r.n:].tolist()
                if r.n < len(chunk):
                    break
        except PoolError:
            if lease and out.slots:
                try:
                    self.release(out.slots)
                except PoolError:
                    pass  # the session ends with the failure; the server gives them back then
            raise
        return out

    def alloc(self, keys: list[bytes]) -> list[tuple[int, int]]:
        """(slot, gen) per key; slot ALLOC_NO_ROOM (-1) when the pool (or this client's quota) has no room,
        ALLOC_EXISTS (-2) when the block is already stored."""
        out = []
        step = MAX_N[Op.ALLOC]
        for i in range(0, len(keys), step):
            chunk = keys[i:i + step]
            r = self._call(Op.ALLOC, len(chunk), payload=_pack_keys(chunk))
            if r.n != len(chunk) or len(r.payload) != 12 * len(chunk):
                self._refuse(Op.ALLOC, f"{r.n} answers for {len(chunk)} keys")
            slots = np.frombuffer(r.payload, np.int64, len(chunk))
            if ((slots >= self.geo.n_slots) | (slots < ALLOC_EXISTS)).any():
                self._refuse(Op.ALLOC, "a slot outside the pool")
            gens = np.frombuffer(r.payload, np.uint32, len(chunk), offset=8 * len(chunk))
            out += list(zip(slots.tolist(), gens.tolist(), strict=True))
        return out

    def commit(self, entries: list[tuple[int, int, int, bytes]]) -> int:
        """Publish written slots: (slot, gen, checksum, key). Returns how many the server accepted: a slot
        this client is not writing, or that was allocated under another key, is not."""
        done = 0
        step = MAX_N[Op.COMMIT]
        for i in range(0, len(entries), step):
            chunk = entries[i:i + step]
            rec = np.array(chunk, COMMIT_REC)
            done += self._call(Op.COMMIT, len(chunk), (self.fmt.block_bytes, 0, 0, 0), rec.tobytes()).ret[0]
        return done

    def abort(self, entries: list[tuple[int, int]]) -> None:
        self._pairs(Op.ABORT, entries)

    def report_bad(self, entries: list[tuple[int, int]]) -> None:
        self._pairs(Op.BAD, entries)

    def _pairs(self, op: Op, entries) -> None:
        step = MAX_N[op]
        for i in range(0, len(entries), step):
            chunk = entries[i:i + step]
            self._call(op, len(chunk), payload=np.array(chunk, PAIR_REC).tobytes())

    def release(self, slots: list[int]) -> None:
        step = MAX_N[Op.RELEASE]
        for i in range(0, len(slots), step):
            chunk = slots[i:i + step]
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
        if not 0 <= slot < self.geo.n_slots:
            raise PoolRefused(f"slot {slot} is outside the pool's {self.geo.n_slots}")
        raw = self.coh.read_record(self.geo.hdr_off + slot * HEADER_BYTES, SLOT_HEADER.itemsize)
        return np.frombuffer(raw, SLOT_HEADER)[0]

    def expected(self, slot: int, gen: int, key: bytes) -> int:
        """The committed checksum of a leased slot, if it holds the block asked for (key and generation);
        IntegrityError otherwise (a miss: never loaded)."""
        h = self.header(slot)
        if int(h["state"]) != COMMITTED or int(h["gen"]) != gen:
            raise IntegrityError(f"slot {slot} changed under its lease (gen {int(h['gen'])} != {gen})")
        if bytes(h["key"]).ljust(KEY_BYTES, b"\0") != key:
            raise IntegrityError(f"slot {slot} holds another key than the one asked for")
        return int(h["checksum"])

    def read_into(self, slot: int, gen: int, key: bytes, out: np.ndarray) -> None:
        """Copy one leased block out of the pool, verified against its header."""
        if not out.flags.c_contiguous or out.nbytes != self.fmt.block_bytes:
            raise ValueError("output must be a contiguous buffer of exactly one block")
        expected = self.expected(slot, gen, key)
        got = self.coh.read_block(self.slot_offset(slot), native.address(out), out.nbytes)
        if got != expected:
            self.report_bad([(slot, gen)])
            raise IntegrityError(f"slot {slot} gen {gen}: checksum mismatch; the block is dropped")

    # -- conveniences ---------------------------------------------------------------------------------
    def put(self, keys: list[bytes], blocks: list[np.ndarray]) -> int:
        """Store blocks under keys (skipping those already stored). Returns how many were committed."""
        entries = []
        for (slot, gen), data, key in zip(self.alloc(keys), blocks, keys, strict=True):
            if slot >= 0:
                entries.append((slot, gen, self.write(slot, data), key))
        return self.commit(entries) if entries else 0

    def get(self, keys: list[bytes]) -> list[np.ndarray]:
        """Read back the longest stored prefix of keys as arrays (verified)."""
        hit = self.lookup(keys)
        try:
            out = []
            for s, g, k in zip(hit.slots, hit.gens, keys, strict=False):
                buf = np.empty(self.fmt.block_bytes, np.uint8)
                self.read_into(s, g, k, buf)
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
                self.ping()
                return
            except PoolUnavailable:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        self._stop.set()
        try:
            self.rpc.close()
        finally:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _beat(rpc_ref, stop: threading.Event, every_s: float) -> None:
    """Keep the session's heartbeat while the client lives (a weak reference: the thread keeps no client
    alive; it ends with the client's close, or when the client is collected)."""
    while not stop.wait(every_s):
        rpc = rpc_ref()
        if rpc is None:
            return
        try:
            rpc.beat()
        except Exception:  # noqa: BLE001 - a heartbeat must never raise into nothing
            log.debug("heartbeat failed", exc_info=True)
        del rpc


def _pack_keys(keys: list[bytes]) -> bytes:
    packed = b"".join(keys)
    # The total and the shortest length together prove every key has the right length, in C loops.
    if keys and (len(packed) != KEY_BYTES * len(keys) or min(map(len, keys)) != KEY_BYTES):
        bad = next(len(k) for k in keys if len(k) != KEY_BYTES)
        raise ValueError(f"block keys are {KEY_BYTES} bytes (sha256), got {bad}")
    return packed


__all__ = ["ALLOC_EXISTS", "ALLOC_NO_ROOM", "IntegrityError", "Lookup", "PoolClient"]
