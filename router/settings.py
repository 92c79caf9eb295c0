"""The router's one settings object: CLI flags, then `BELUGA_ROUTER_*` environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr
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
    max_body_bytes: int = Field(8 << 20, gt=0, description="a request body past this is refused (413) as it "
                                                           "arrives, never buffered whole")
    max_prompt_chars: int = Field(2_000_000, gt=0)
    affinity_prefix_chars: int = Field(1024, gt=0, description="prefix-affinity: chars of prompt hashed")

    # Slow clients: a connection must send each request's head within head_timeout_s and its body within
    # body_timeout_s of the head; an idle keep-alive connection closes after keep_alive_s. Together they
    # close a trickling connection within 25 s by default.
    head_timeout_s: float = Field(10.0, gt=0, description="request line and headers, from the connection "
                                                          "(or the previous answer)")
    body_timeout_s: float = Field(15.0, gt=0, description="the whole body, from the end of the headers")
    keep_alive_s: int = Field(5, gt=0, description="idle time between requests on one connection")
    max_header_bytes: int = Field(16 << 10, ge=4096, description="request line and headers (h11)")
    max_connections: int = Field(4096, gt=0, description="connections and tasks; beyond: 503 (uvicorn)")

    # Tenants. With keys (either setting), every /v1 request needs `Authorization: Bearer <key>`, and the
    # key's tenant salts the request's KV cache; /workers and /metrics take a tenant key or an admin key.
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (JSON)")
    api_keys_file: str | None = Field(None, description="'key tenant' lines; '#' comments and blank lines; "
                                                        "any other line stops the router")
    admin_api_keys: list[str] = Field(default_factory=list, description="keys for /workers and /metrics only")
    admin_api_keys_file: str | None = Field(None, description="one admin key a line")
    # The workers' own key (vLLM's --api-key), sent as `Authorization: Bearer` on every upstream request.
    worker_api_key: SecretStr | None = None
    worker_api_key_file: str | None = Field(None, description="a file holding the workers' key")
    worker_header: bool = Field(False, description="always answer with x-beluga-worker (otherwise only to a "
                                                   "request with x-beluga-debug: 1)")
