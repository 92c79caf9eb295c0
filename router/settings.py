"""The router's one settings object: CLI flags, then `BELUGA_ROUTER_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BELUGA_ROUTER_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    policy: str = Field("least-loaded", description="least-loaded, least-tokens, round-robin, power-of-two, "
                                                    "prefix-affinity")
    discovery: str = Field("static", description="static, ray or dns")
    workers: list[str] = Field(default_factory=list, description="static: worker base URLs")
    ray_address: str | None = Field(None, description="ray: cluster address (default: the local one)")
    dns_name: str | None = Field(None, description="dns: headless service name")
    dns_port: int = Field(8000, ge=1, le=65535)
    health_interval_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(2.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(2, ge=0, description="other workers tried on connect errors and early 5xx")
    max_in_flight: int = Field(256, gt=0, description="requests proxied at once")
    max_queue: int = Field(1024, ge=0, description="requests waiting for a place; beyond: 429")
    max_body_bytes: int = Field(8 << 20, gt=0)
    max_prompt_chars: int = Field(2_000_000, gt=0)
    affinity_prefix_chars: int = Field(1024, gt=0, description="prefix-affinity: chars of prompt hashed")
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (JSON)")
    api_keys_file: str | None = Field(None, description="file of 'key tenant' lines")
