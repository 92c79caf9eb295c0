"""One settings object for the pool: read from CLI flags, then `BELUGA_POOL_*` environment variables."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from beluga.cxlpool.coherence import MODES, STEPS


class PoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BELUGA_POOL_", extra="forbid")

    path: list[str] = Field(default_factory=lambda: ["/dev/shm/beluga-pool"],
                            description="pool file(s) or /dev/daxX.Y node(s); several are interleaved")
    size: int = Field(1 << 30, gt=0, description="pool bytes (all regions together)")
    interleave: int = Field(2 << 20, gt=0, description="interleave granularity across regions")
    group_access: bool = Field(False, description="create the pool 0660 instead of 0600")
    clients: int = Field(64, gt=0, le=4096, description="RPC slots: processes attached at once")
    coherence: str = Field("coherent", description=f"one of {MODES}")
    eviction: str = Field("s3fifo", description="s3fifo (default: measured better, bench/eviction.py) or lru")
    high_watermark: float = Field(0.95, gt=0, le=1, description="evict when used slots exceed this")
    low_watermark: float = Field(0.85, gt=0, le=1, description="evict down to this")
    populate: bool = Field(True, description="fault the data area in at attach: no page faults on the copy path")
    spin_us: int = Field(200, ge=0, description="server spins this long after a request, then parks")
    rpc_timeout_s: float = Field(5.0, gt=0)
    transport: str = Field("shm", description="shm (through the pool) or tcp")
    tcp_host: str = "127.0.0.1"
    tcp_port: int = Field(7701, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(7700, ge=0, le=65535)
    test_drop: list[str] = Field(default_factory=list,
                                 description=f"TESTS ONLY: protocol steps to skip, of {STEPS}")

    @field_validator("coherence")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"coherence must be one of {MODES}")
        return v

    @field_validator("transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        if v not in ("shm", "tcp"):
            raise ValueError("transport must be shm or tcp")
        return v
