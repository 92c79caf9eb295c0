"""The pool's on-memory layout: superblock, RPC slots, slot headers, data slots.

Every offset and size is in the superblock, so a process attaching to a pool trusts nothing but what is
written there, and refuses a pool whose version, geometry or KV format differs from what it expects
(an engine fed KV bytes of another format would produce garbage, not an error).

    [ superblock 4 KiB | server status 4 KiB | RPC slots | slot headers | data slots ]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from beluga.cxlpool.errors import PoolFormatError
from beluga.cxlpool.protocol import SLOT_BYTES

MAGIC = b"BELUGAKV"
VERSION = 2  # 2: session tokens in the RPC slots; coherence, transports and parallel ranks described
PAGE = 4096
HEADER_BYTES = 64

COHERENCE_MODES = ("coherent", "native", "simulated")
TRANSPORTS = ("shm", "tcp")

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}

SUPERBLOCK = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("n_clients", "<u4"),
        ("total_bytes", "<u8"),
        ("n_slots", "<u8"),
        ("slot_bytes", "<u8"),
        ("rpc_bytes", "<u8"),
        ("rpc_off", "<u8"),
        ("hdr_off", "<u8"),
        ("data_off", "<u8"),
        ("model", "S96"),
        ("dtype", "S16"),
        ("layout", "S16"),
        ("hash_domain", "S16"),
        ("layers", "<u4"),
        ("kv_heads", "<u4"),
        ("head_dim", "<u4"),
        ("block_tokens", "<u4"),
        ("block_bytes", "<u8"),
        ("tp_size", "<u4"),
        ("pp_size", "<u4"),
        ("coherence", "S16"),
        ("transports", "<u4"),  # bit i: TRANSPORTS[i] is served
    ]
)

# Written only by the metadata server (its own page: no client ever writes these lines).
SERVER_STATUS = np.dtype(
    [
        ("pid", "<u8"),
        ("epoch", "<u8"),
        ("heartbeat_ns", "<u8"),
        ("sleeping", "<u8"),
        ("beat", "<u8"),  # bumped several times a second while a server runs: a second server waits and sees
    ]
)

# Slot header, written only by the metadata server at commit, durable: recovery rebuilds the index
# from these. `state` is written last.
SLOT_HEADER = np.dtype(
    [
        ("state", "<u4"),
        ("gen", "<u4"),
        ("length", "<u8"),
        ("checksum", "<u8"),
        ("key", "S32"),
        ("commit_ns", "<u8"),
    ]
)
assert SLOT_HEADER.itemsize <= HEADER_BYTES

FREE, WRITING, COMMITTED = 0, 1, 2


def server_status(mem: np.ndarray) -> np.ndarray:
    """The server's status page (a view; only the metadata server writes it)."""
    return np.ndarray(1, SERVER_STATUS, buffer=mem, offset=PAGE)


@dataclass(frozen=True)
class KVFormat:
    """What one KV block holds. A pool serves exactly one format."""

    model: str
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    layout: str = "generic"  # the engine layout that produced the block bytes (e.g. "cpu", "flash")
    hash_domain: str = ""  # fingerprint of the engines' block-hash seed: keys from other seeds never match
    # Engines split over ranks store one shard per rank (see `connector.rank_key`); all ranks of a pool's
    # engines must be laid out alike, or a rank would load another layout's shard.
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self):
        if self.dtype not in DTYPE_SIZES:
            raise PoolFormatError(f"unknown KV dtype {self.dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
        for name in ("layers", "kv_heads", "head_dim", "block_tokens", "tp_size", "pp_size"):
            if int(getattr(self, name)) <= 0:
                raise PoolFormatError(f"KV format field {name} must be positive, got {getattr(self, name)}")
        if len(self.layout.encode()) > 16 or len(self.hash_domain.encode()) > 16:
            raise PoolFormatError("layout and hash_domain are at most 16 bytes")
        if len(self.model.encode()) > 96:
            raise PoolFormatError("model id longer than 96 bytes")

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one layer's K (or V) for one block."""
        return self.block_tokens * self.kv_heads * self.head_dim * DTYPE_SIZES[self.dtype]

    @property
    def block_bytes(self) -> int:
        return self.layers * 2 * self.chunk_bytes

    def describe(self) -> dict:
        return asdict(self) | {"block_bytes": self.block_bytes}


@dataclass(frozen=True)
class Geometry:
    n_slots: int
    slot_bytes: int
    n_clients: int
    rpc_bytes: int
    rpc_off: int
    hdr_off: int
    data_off: int
    total_bytes: int

    @staticmethod
    def plan(fmt: KVFormat, total_bytes: int, n_clients: int = 64, align: int = PAGE) -> Geometry:
        """Fit as many slots as the region holds after the fixed areas."""
        if n_clients <= 0:
            raise PoolFormatError("n_clients must be positive")
        slot_bytes = _round_up(fmt.block_bytes, max(PAGE, 64))
        rpc_bytes = SLOT_BYTES
        rpc_off = 2 * PAGE
        hdr_off = rpc_off + n_clients * rpc_bytes
        fixed = hdr_off
        # slots: header (64 B) + data (slot_bytes); data area aligned to `align`.
        n_slots = (total_bytes - fixed - align) // (slot_bytes + HEADER_BYTES)
        if n_slots < 1:
            need = fixed + align + slot_bytes + HEADER_BYTES
            raise PoolFormatError(
                f"pool of {total_bytes} bytes holds no block of {fmt.block_bytes} bytes; "
                f"use at least {need} bytes (--size)"
            )
        data_off = _round_up(hdr_off + n_slots * HEADER_BYTES, align)
        return Geometry(n_slots, slot_bytes, n_clients, rpc_bytes, rpc_off, hdr_off, data_off, total_bytes)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class Service:
    """How the pool is served, fixed at creation: every process reads it from the superblock, so server
    and clients cannot disagree (an explicit setting that differs is refused, naming both values)."""

    coherence: str = "coherent"
    transports: tuple[str, ...] = TRANSPORTS

    def __post_init__(self):
        if self.coherence not in COHERENCE_MODES:
            raise PoolFormatError(f"coherence must be one of {COHERENCE_MODES}, got {self.coherence!r}")
        if not self.transports or set(self.transports) - set(TRANSPORTS):
            raise PoolFormatError(f"transports must be a non-empty subset of {TRANSPORTS}, got {self.transports}")


def write_superblock(mem: np.ndarray, fmt: KVFormat, geo: Geometry, svc: Service = Service()) -> None:
    sb = np.zeros(1, SUPERBLOCK)[0]
    sb["version"] = VERSION
    for k in ("n_clients", "total_bytes", "n_slots", "slot_bytes", "rpc_bytes", "rpc_off", "hdr_off",
              "data_off"):
        sb[k] = getattr(geo, k)
    sb["model"] = fmt.model.encode()
    sb["dtype"] = fmt.dtype.encode()
    sb["layout"] = fmt.layout.encode()
    sb["hash_domain"] = fmt.hash_domain.encode()
    for k in ("layers", "kv_heads", "head_dim", "block_tokens", "tp_size", "pp_size"):
        sb[k] = getattr(fmt, k)
    sb["block_bytes"] = fmt.block_bytes
    sb["coherence"] = svc.coherence.encode()
    sb["transports"] = sum(1 << TRANSPORTS.index(t) for t in set(svc.transports))
    raw = np.frombuffer(sb.tobytes(), np.uint8)
    mem[: raw.size] = raw
    # The magic goes last: a half-formatted pool is never taken for a valid one.
    mem[:8] = np.frombuffer(MAGIC, np.uint8)


def read_superblock(mem: np.ndarray) -> tuple[KVFormat, Geometry, Service]:
    if mem.size < PAGE:
        raise PoolFormatError(f"region of {mem.size} bytes is too small to be a pool")
    sb = np.frombuffer(mem[: SUPERBLOCK.itemsize].tobytes(), SUPERBLOCK)[0]
    if bytes(sb["magic"]) != MAGIC:
        raise PoolFormatError("not a Beluga pool (bad magic); create it with `beluga pool create`")
    if int(sb["version"]) != VERSION:
        raise PoolFormatError(f"pool format version {int(sb['version'])}, this build reads {VERSION}")
    fmt = KVFormat(
        model=sb["model"].decode(),
        dtype=sb["dtype"].decode(),
        layers=int(sb["layers"]),
        kv_heads=int(sb["kv_heads"]),
        head_dim=int(sb["head_dim"]),
        block_tokens=int(sb["block_tokens"]),
        layout=sb["layout"].decode(),
        hash_domain=sb["hash_domain"].decode(),
        tp_size=int(sb["tp_size"]),
        pp_size=int(sb["pp_size"]),
    )
    svc = Service(sb["coherence"].decode(), tuple(t for i, t in enumerate(TRANSPORTS) if sb["transports"] >> i & 1))
    geo = Geometry(*(int(sb[k]) for k in ("n_slots", "slot_bytes", "n_clients", "rpc_bytes", "rpc_off",
                                           "hdr_off", "data_off", "total_bytes")))
    if geo.total_bytes > mem.size:
        raise PoolFormatError(f"superblock says {geo.total_bytes} bytes but the region has {mem.size}")
    if geo.rpc_bytes != SLOT_BYTES or geo.data_off + geo.n_slots * geo.slot_bytes > geo.total_bytes \
            or geo.slot_bytes < fmt.block_bytes or geo.hdr_off + geo.n_slots * HEADER_BYTES > geo.data_off \
            or geo.rpc_off < 2 * PAGE or geo.rpc_off + geo.n_clients * geo.rpc_bytes > geo.hdr_off:
        raise PoolFormatError("the superblock's geometry is inconsistent; recreate the pool")
    return fmt, geo, svc


def check_format(found: KVFormat, expected: KVFormat) -> None:
    """Refuse a pool whose KV format differs from the engine's, naming every field that differs."""
    diffs = [
        f"{k}: pool has {getattr(found, k)!r}, engine has {getattr(expected, k)!r}"
        for k in (f.name for f in fields(KVFormat)) if getattr(found, k) != getattr(expected, k)
    ]
    if diffs:
        raise PoolFormatError("KV format mismatch (" + "; ".join(diffs) + "); use a pool created for this "
                              "model and engine, or create a new one")
