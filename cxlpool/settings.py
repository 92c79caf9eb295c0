"""One settings object for the pool: read from CLI flags, then `BELUGA_POOL_*` environment variables.

How the pool is served (coherence mode, transports) is written into the pool at creation; here those two
are `None` by default, meaning "what the pool says". A value given explicitly must agree with the pool,
or attaching fails naming both (see `pool.attach`).
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from beluga.cxlpool.coherence import STEPS
from beluga.cxlpool.layout import COHERENCE_MODES, TRANSPORTS
from beluga.cxlpool.region import kind_of


class PoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BELUGA_POOL_", extra="forbid")

    path: list[str] = Field(default_factory=lambda: ["/dev/shm/beluga-pool"],
                            description="pool file(s) or /dev/daxX.Y node(s); several are interleaved")
    size: int = Field(1 << 30, gt=0, description="pool bytes (all regions together)")
    interleave: int = Field(2 << 20, gt=0, description="interleave granularity across regions")
    group_access: bool = Field(False, description="create the pool (and its token) 0660 instead of 0600")
    clients: int = Field(64, gt=0, le=4096, description="RPC slots: pool clients attached at once")
    coherence: str | None = Field(None, description=f"one of {COHERENCE_MODES}; default: the pool's")
    transports: list[str] | None = Field(None, description="what `pool create` lets the server serve "
                                                           f"(of {TRANSPORTS}); default: both")
    eviction: str = Field("s3fifo", description="s3fifo (default: measured better, bench/eviction.py) or lru")
    high_watermark: float = Field(0.95, gt=0, le=1, description="evict when used slots exceed this")
    low_watermark: float = Field(0.85, gt=0, le=1, description="evict down to this")
    populate: bool = Field(True, description="fault the data area in at attach: no page faults on the copy path")
    spin_us: int = Field(200, ge=0, description="server spins this long after a request, then parks")
    rpc_timeout_s: float = Field(5.0, gt=0)
    heartbeat_timeout_s: float = Field(5.0, gt=0, le=600, description="a client whose heartbeat is older "
                                       "is reaped: its leases and half-written slots go back to the pool")
    write_timeout_s: float = Field(60.0, gt=0, description="a slot allocated for writing and not committed "
                                   "this long is reclaimed, even while its client lives")
    client_quota: float = Field(0.5, gt=0, le=1, description="share of the slots one client may hold "
                                "leased, and (separately) allocated for writing, at once")
    transport: str | None = Field(None, description="how this client calls the server: shm or tcp; "
                                  "default: shm if the pool serves it")
    tcp_host: str = "127.0.0.1"
    tcp_port: int = Field(7701, ge=0, le=65535)
    token_file: str | None = Field(None, description="the pool token (TCP RPC); default: beside the pool "
                                   "file, or /etc/beluga/<dax node>.token")
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(7700, ge=0, le=65535)
    test_drop: list[str] = Field(default_factory=list,
                                 description=f"TESTS ONLY (simulated coherence only): protocol steps to skip, "
                                             f"of {STEPS}")

    @field_validator("coherence")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        if v is not None and v not in COHERENCE_MODES:
            raise ValueError(f"coherence must be one of {COHERENCE_MODES}")
        return v

    @field_validator("transport")
    @classmethod
    def _transport(cls, v: str | None) -> str | None:
        if v is not None and v not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        return v

    @field_validator("transports")
    @classmethod
    def _transports(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            v = [t for part in v for t in part.split(",") if t]
            if not v or set(v) - set(TRANSPORTS):
                raise ValueError(f"transports must be a non-empty subset of {TRANSPORTS}")
        return v

    @model_validator(mode="after")
    def _test_only(self) -> PoolSettings:
        # Dropping a flush is how a test proves the protocol needs it; on real memory it would serve stale
        # bytes, so it is refused outside the simulated mode (which no deployment runs).
        if self.test_drop and self.coherence != "simulated":
            raise ValueError("test_drop is for tests of the simulated coherence mode only")
        if self.low_watermark > self.high_watermark:
            raise ValueError("low_watermark must not exceed high_watermark")
        return self

    def token_path(self) -> str:
        if self.token_file:
            return self.token_file
        first = self.path[0]
        if kind_of(first) == "devdax":
            return f"/etc/beluga/{os.path.basename(first)}.token"
        return first + ".token"
