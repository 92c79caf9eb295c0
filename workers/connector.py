"""BelugaConnector: vLLM's KV connector over the shared pool.

    vllm serve MODEL --prefix-caching-hash-algo sha256_cbor --kv-transfer-config '{
        "kv_connector": "BelugaConnector", "kv_connector_module_path": "beluga.workers.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pool": "/dev/shm/beluga-pool"}}'
    (with PYTHONHASHSEED set, the same in every engine)

Scheduler side: how many of a prompt's blocks (beyond what the engine holds itself) the pool has; those
are leased until the request finishes, so they cannot be evicted under the load. Worker side: before the
forward pass, copy the leased slots into the engine's cache blocks (checksums verified; a bad block is
reported and recomputed); after it, copy newly full blocks into fresh slots and commit them.

Keys are vLLM's own block hashes (chained, so one key names a whole prefix; a request's cache_salt is
hashed into its first block, so tenants never share). Engines split over tensor- or pipeline-parallel
ranks store one shard per rank under a key of that rank (`rank_key`); the scheduler counts a block as a
hit only when every rank's shard is in the pool, and each worker loads its own. A prompt's last, partial
block is stored too, under a key of its own (`tail_key`): a repeated prompt then loads everything but its
last token, where a cache of full blocks only recomputes up to a block's worth of tokens. When the pool is
unreachable the connector answers "no hit", saves nothing, logs once, and retries later: the engine computes
as if it were absent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, start_http_server
from pydantic import BaseModel, Field, ValidationError
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.errors import IntegrityError, PoolError, PoolFormatError
from beluga.cxlpool.settings import PoolSettings
from beluga.kernels import layout as cache_layout
from beluga.workers.datapath import DataPath
from beluga.workers.kvformat import CRYPTO_HASHES, kv_format, model_id_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

METRICS = {
    "hit_tokens": Counter("beluga_connector_hit_tokens", "prompt tokens loaded from the pool"),
    "loaded_blocks": Counter("beluga_connector_loaded_blocks", "blocks copied pool -> engine"),
    "loaded_bytes": Counter("beluga_connector_loaded_bytes", "bytes copied pool -> engine"),
    "saved_blocks": Counter("beluga_connector_saved_blocks", "blocks copied engine -> pool"),
    "saved_bytes": Counter("beluga_connector_saved_bytes", "bytes copied engine -> pool"),
    "load_seconds": Counter("beluga_connector_load_seconds", "time spent loading"),
    "save_seconds": Counter("beluga_connector_save_seconds", "time spent saving"),
    "fallbacks": Counter("beluga_connector_fallbacks", "times the engine recomputed: pool down or bad block"),
    "bad_blocks": Counter("beluga_connector_bad_blocks", "blocks that failed their checksum"),
    "key_mismatches": Counter("beluga_connector_key_mismatches", "blocks whose slot held another key or "
                              "generation than leased: a miss, never loaded"),
}


class ConnectorSettings(BaseModel):
    """`kv_connector_extra_config`."""

    model_config = {"extra": "forbid"}

    pool: str | list[str] = Field(description="pool file(s) or /dev/dax node(s), as created by `beluga pool`")
    coherence: str | None = Field(None, description="default: the pool's; if given, it must be the pool's")
    transport: str | None = Field(None, description="shm or tcp; default: shm if the pool serves it")
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 7701
    token_file: str | None = Field(None, description="the pool token (TCP); default: beside the pool file")
    rpc_timeout_s: float = Field(1.0, gt=0)
    retry_after_s: float = Field(5.0, ge=0, description="after the pool fails, compute locally this long")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus endpoint of the worker")
    model_id: str | None = None
    layout: str | None = None
    load: bool = True
    save: bool = True

    def pool_settings(self) -> PoolSettings:
        paths = [self.pool] if isinstance(self.pool, str) else self.pool
        return PoolSettings(path=paths, coherence=self.coherence, transport=self.transport,
                            tcp_host=self.tcp_host, tcp_port=self.tcp_port, token_file=self.token_file,
                            rpc_timeout_s=self.rpc_timeout_s)


def check_hashing(algo: str, seed: str | None) -> None:
    """Refuse unless block hashes are identical in every engine process: a cryptographic algorithm and a
    fixed seed. Otherwise two engines name the same prefix differently and never share."""
    if algo not in CRYPTO_HASHES or seed is None or seed == "random":
        raise ValueError(
            "BelugaConnector needs block hashes that are identical in every engine: start vLLM with "
            "--prefix-caching-hash-algo sha256_cbor and the same fixed PYTHONHASHSEED (e.g. "
            f"PYTHONHASHSEED=0) everywhere (now: algo={algo}, PYTHONHASHSEED={seed})")


def connector_config(pool: str, **extra) -> dict:
    """The `--kv-transfer-config` for an engine using the pool at `pool`."""
    return {"kv_connector": "BelugaConnector", "kv_connector_module_path": "beluga.workers.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"pool": pool, **extra}}


TAIL_TAG = b"beluga:tail"
RANK_TAG = b"beluga:rank"


def rank_key(key: bytes, rank: int, world: int) -> bytes:
    """The pool key of one rank's shard of a block. One engine rank (world 1) keeps vLLM's key."""
    if world == 1:
        return key
    return hashlib.sha256(key + RANK_TAG + rank.to_bytes(4, "little") + world.to_bytes(4, "little")).digest()


def tail_key(prefix_hash: bytes, tokens) -> bytes:
    """The pool key of a prompt's last, partial block: the hash of the full blocks before it (which names
    the whole prefix, cache_salt included) and the tail's own token ids."""
    return hashlib.sha256(prefix_hash + TAIL_TAG + array("q", tokens).tobytes()).digest()


@dataclass
class LoadSpec:
    keys: list[bytes]  # vLLM's keys; each rank loads rank_key(key) from slots[rank]
    slots: list[list[int]]  # per rank
    gens: list[list[int]]
    block_ids: list[int]
    tokens: int = 0  # prompt tokens these blocks give the engine (the last block may be a partial tail)


@dataclass
class SaveSpec:
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class BelugaMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # Scheduler-side counts, carried to the worker whose Prometheus endpoint publishes them.
    counts: dict[str, float] = field(default_factory=dict)


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0
    leased: list[int] = field(default_factory=list)  # every rank's slots
    plan: LoadSpec | None = None
    start_block: int = 0
    tail_saved: bool = False


class BelugaConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST  # the pool is (CXL or local) host memory

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache, not a hand-off: a save lost to preemption is only a future miss.
        return False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        try:
            self.settings = ConnectorSettings(**self._kv_transfer_config.kv_connector_extra_config)
        except ValidationError as e:
            raise ValueError(f"BelugaConnector: bad kv_connector_extra_config: {e}") from None
        self.block_size = vllm_config.cache_config.block_size
        self.fmt = self._format(vllm_config)
        self.world = self.fmt.tp_size * self.fmt.pp_size
        self.rank = self._rank() if role == KVConnectorRole.WORKER else 0
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            raise ValueError('BelugaConnector needs "kv_load_failure_policy": "recompute" in '
                             "--kv-transfer-config, so that a block that fails its checksum is recomputed")
        try:
            self.client = PoolClient(self.settings.pool_settings(), expect=self.fmt)
        except PoolFormatError as e:
            raise ValueError(f"BelugaConnector: pool {self.settings.pool} does not fit this engine: {e}") from e
        self.down_until = 0.0
        self._down_logged = False
        try:
            self.client.ping()  # also compiles the RPC path now rather than in the first request's TTFT
        except PoolError as e:
            self._pool_failed("start-up", e)
        # scheduler side
        self.reqs: dict[str, _ReqState] = {}
        self._pending: dict[str, float] = {}
        # worker side
        self.path: DataPath | None = None
        self.invalid: set[int] = set()
        if role == KVConnectorRole.WORKER and self.settings.metrics_port is not None:
            start_http_server(self.settings.metrics_port, addr="127.0.0.1")
        log.info("BelugaConnector (%s) on pool %s: %d slots, %d-byte blocks", role.name, self.settings.pool,
                 self.client.geo.n_slots, self.fmt.block_bytes)

    # -- configuration checks ---------------------------------------------------------------------------
    def _format(self, cfg: VllmConfig):
        algo = cfg.cache_config.prefix_caching_hash_algo
        seed = os.environ.get("PYTHONHASHSEED")  # the engine process's own hash seed, as vLLM reads it
        check_hashing(algo, seed)
        mc, pc = cfg.model_config, cfg.parallel_config
        dtype = cfg.cache_config.cache_dtype
        if dtype in (None, "auto"):
            dtype = str(mc.dtype).removeprefix("torch.")
        from vllm.platforms import current_platform

        layout = self.settings.layout or ("cpu" if current_platform.is_cpu() else "cuda")
        # Per rank: a pipeline stage's layers, a tensor-parallel shard's KV heads (vLLM's own split).
        return kv_format(self.settings.model_id or model_id_for(mc.model, getattr(mc, "revision", None)),
                         mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size(), self.block_size, dtype,
                         layout, algo, seed, pc.tensor_parallel_size, pc.pipeline_parallel_size)

    def _rank(self) -> int:
        """This worker's rank among the engine's tensor x pipeline ranks."""
        if self.world == 1:
            return 0
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return get_pp_group().rank_in_group * self.fmt.tp_size + get_tensor_model_parallel_rank()

    def _pool_ok(self) -> bool:
        return time.monotonic() >= self.down_until

    def _count(self, name: str, value: float = 1) -> None:
        if self.role == KVConnectorRole.WORKER:
            METRICS[name].inc(value)
        else:
            self._pending[name] = self._pending.get(name, 0) + value

    def _pool_failed(self, what: str, err: Exception) -> None:
        self._count("fallbacks")
        self.down_until = time.monotonic() + self.settings.retry_after_s
        if not self._down_logged:
            log.warning("pool unavailable during %s (%s); computing locally, retrying every %.0fs", what, err,
                        self.settings.retry_after_s)
            self._down_logged = True

    def _pool_back(self) -> None:
        if self._down_logged:
            log.info("pool reachable again")
            self._down_logged = False

    # -- scheduler side ---------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _ReqState(request)
        self._drop_lease(st)
        if not self.settings.load or not self._pool_ok():
            return 0, False
        n_prompt = request.num_prompt_tokens
        full = min(n_prompt // self.block_size, len(request.block_hashes))
        start = num_computed_tokens // self.block_size
        keys = [bytes(h) for h in request.block_hashes[start:full]]
        tail = self._tail(request)
        if tail is not None:
            keys.append(tail)
        if not keys:
            return 0, False
        try:
            hits = self._lookup_ranks(st, keys)
            self._pool_back()
        except PoolError as e:
            self._drop_lease(st)
            self._pool_failed("lookup", e)
            return 0, False
        n_hit = min(len(h.slots) for h in hits)  # a block counts when every rank's shard is there
        covered = n_prompt if n_hit > full - start else (start + n_hit) * self.block_size
        # At least one prompt token must be computed by the engine: it yields the first output token.
        matched = min(covered, n_prompt - 1) - start * self.block_size
        if matched <= 0:
            self._drop_lease(st)
            return 0, False
        st.plan = LoadSpec(keys[:n_hit], [h.slots[:n_hit] for h in hits], [h.gens[:n_hit] for h in hits], [])
        st.start_block = start
        return matched, False

    def _lookup_ranks(self, st: _ReqState, keys: list[bytes]):
        """Each rank's longest run of shards, leased (one lookup per rank, stopping at the first miss)."""
        hits = []
        for r in range(self.world):
            hit = self.client.lookup([rank_key(k, r, self.world) for k in keys], lease=True)
            st.leased += hit.slots
            hits.append(hit)
            keys = keys[:len(hit.slots)]
            if not keys:
                break
        return hits + [hits[-1]] * (self.world - len(hits))

    def _tail(self, request: Request) -> bytes | None:
        """The key of the prompt's partial last block, if it has one and its tokens alone name its
        content (no multimodal inputs or LoRA, which vLLM hashes beside the tokens)."""
        n, bs = request.num_prompt_tokens, self.block_size
        full = n // bs
        if (n % bs == 0 or full == 0 or len(request.block_hashes) < full or request.prompt_token_ids is None
                or request.mm_features or request.lora_request is not None):
            return None
        return tail_key(bytes(request.block_hashes[full - 1]), request.prompt_token_ids[full * bs:n])

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0 or st.plan is None:
            self._drop_lease(st)
            return
        ids = blocks.get_block_ids()[0]
        n = -(-num_external_tokens // self.block_size)  # the last one may be the prompt's partial block
        p = st.plan
        p.block_ids = list(ids[st.start_block: st.start_block + n])
        p.keys, p.slots, p.gens = p.keys[:n], [s[:n] for s in p.slots], [g[:n] for g in p.gens]
        p.tokens = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = BelugaMetadata(counts=self._pending)
        self._pending = {}
        for new in scheduler_output.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            if st.plan is not None and st.plan.block_ids:
                meta.loads.append(st.plan)
            st.plan = None
            st.saved_blocks = new.num_computed_tokens // self.block_size
            self._plan_save(meta, st, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
                st.saved_blocks = min(st.saved_blocks, cached.num_computed_tokens[i] // self.block_size)
            elif new_ids:
                st.block_ids += list(new_ids[0])
            self._plan_save(meta, st, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id])
        return meta

    def _plan_save(self, meta: BelugaMetadata, st: _ReqState, computed_after: int) -> None:
        if not self.settings.save or not self._pool_ok():
            return
        keys: list[bytes] = []
        ids: list[int] = []
        full = min(computed_after // self.block_size, len(st.request.block_hashes), len(st.block_ids))
        if full > st.saved_blocks:
            keys += [bytes(h) for h in st.request.block_hashes[st.saved_blocks:full]]
            ids += st.block_ids[st.saved_blocks:full]
            st.saved_blocks = full
        if not st.tail_saved and computed_after >= st.request.num_prompt_tokens:
            # The step that completes the prompt: its partial last block holds exactly the prompt's tail.
            st.tail_saved = True
            tail, at = self._tail(st.request), st.request.num_prompt_tokens // self.block_size
            if tail is not None and at < len(st.block_ids):
                keys.append(tail)
                ids.append(st.block_ids[at])
        if keys:
            meta.saves.append(SaveSpec(keys, ids))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        st = self.reqs.pop(request.request_id, None)
        if st is not None:
            self._drop_lease(st)
        return False, None

    def _drop_lease(self, st: _ReqState) -> None:
        if st.leased:
            try:
                self.client.release(st.leased)
            except PoolError as e:
                self._pool_failed("release", e)  # the server reaps our session's leases when it ends
            st.leased = []
        st.plan = None

    # -- worker side ------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]):
        names = sorted(kv_caches, key=_layer_index)
        lay = cache_layout.from_tensors([kv_caches[n] for n in names], self._kv_cache_config.num_blocks)
        if lay.block_bytes != self.fmt.block_bytes:
            raise ValueError(f"BelugaConnector: the engine's cache blocks are {lay.block_bytes} bytes "
                             f"({lay.signature}), the pool's format says {self.fmt.block_bytes}")
        first = kv_caches[names[0]]
        self.path = DataPath(self.client, lay, on_gpu=getattr(first, "is_cuda", False))
        log.info("BelugaConnector: %d layers, %d runs of %d bytes per block (%s)", lay.layers,
                 lay.runs.shape[1], lay.run_bytes, lay.signature)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, BelugaMetadata):
            for name, value in connector_metadata.counts.items():
                METRICS[name].inc(value)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, BelugaMetadata) or not meta.loads or self.path is None:
            return
        t0 = time.perf_counter()
        for spec in meta.loads:
            self._load(spec)
        METRICS["load_seconds"].inc(time.perf_counter() - t0)

    def _load(self, spec: LoadSpec) -> None:
        """Copy this rank's shards in, after checking each slot still holds the key and generation leased;
        the checksums of what was copied are compared after. Any mismatch: recompute from there on."""
        n = len(spec.block_ids)
        slots, gens = spec.slots[self.rank][:n], spec.gens[self.rank][:n]
        keys = [rank_key(k, self.rank, self.world) for k in spec.keys[:n]]
        expected, failure = [], None
        for s, g, k in zip(slots, gens, keys, strict=True):
            try:
                expected.append(self.client.expected(s, g, k))
            except PoolError as e:
                if isinstance(e, IntegrityError):
                    METRICS["key_mismatches"].inc()
                failure = e
                break
        got = self.path.load(slots[:len(expected)], spec.block_ids[:len(expected)]) if expected else []
        bad = [i for i in range(len(expected)) if int(got[i]) != expected[i]]
        if bad:
            METRICS["bad_blocks"].inc(len(bad))
            try:
                self.client.report_bad([(slots[i], gens[i]) for i in bad])
            except PoolError:
                pass
            failure = IntegrityError(f"{len(bad)} block(s) failed their checksum")
        good = bad[0] if bad else len(expected)
        if failure is not None:
            self._fail_blocks(spec, good, failure)
        n = good
        METRICS["loaded_blocks"].inc(n)
        METRICS["loaded_bytes"].inc(n * self.fmt.block_bytes)
        METRICS["hit_tokens"].inc(spec.tokens if n == len(spec.block_ids) else n * self.block_size)

    def _fail_blocks(self, spec: LoadSpec, first: int, err: Exception) -> None:
        """Tell vLLM to recompute these blocks (and, the chain being causal, all after them)."""
        self.invalid.update(spec.block_ids[first:])
        self._count("fallbacks")
        log.warning("pool load failed for %d block(s): %s; recomputing", len(spec.block_ids) - first, err)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self.invalid = self.invalid, set()
        return out

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # CPU loads are complete when start_load_kv returns

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saved all layers at once in wait_for_save: one pass, one commit

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, BelugaMetadata) or not meta.saves or self.path is None or not self._pool_ok():
            return
        t0 = time.perf_counter()
        for spec in meta.saves:
            try:
                self._save(spec)
                self._pool_back()
            except PoolError as e:
                self._pool_failed("save", e)
                break
        METRICS["save_seconds"].inc(time.perf_counter() - t0)

    def _save(self, spec: SaveSpec) -> None:
        """This rank's shards into fresh slots, then one commit; a failure gives the slots back."""
        keys = [rank_key(k, self.rank, self.world) for k in spec.keys]
        got = self.client.alloc(keys)
        todo = [(i, s, g) for i, (s, g) in enumerate(got) if s >= 0]
        if not todo:
            return
        try:
            sums = self.path.save([spec.block_ids[i] for i, _, _ in todo], [s for _, s, _ in todo])
            self.client.commit([(s, g, int(c), keys[i]) for (i, s, g), c in zip(todo, sums, strict=True)])
        except BaseException:
            try:
                self.client.abort([(s, g) for _, s, g in todo])
            except PoolError:
                pass  # the server reclaims them at the write timeout, or when our session ends
            raise
        METRICS["saved_blocks"].inc(len(todo))
        METRICS["saved_bytes"].inc(len(todo) * self.fmt.block_bytes)

    def shutdown(self):
        if self.path is not None:
            self.path.close()
        self.client.close()


def _layer_index(name: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else 1 << 30, name)
