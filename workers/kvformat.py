"""The pool format an engine needs, derived the same way by the connector and by `beluga pool create`.

Two engines share blocks only if the bytes mean the same thing (model, dtype, geometry, engine layout)
and the keys mean the same thing (block-hash algorithm and seed). All of that goes into the pool's
format descriptor, so a mismatched engine is refused at attach time instead of reading wrong KV.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from beluga.cxlpool.layout import KVFormat

CRYPTO_HASHES = ("sha256", "sha256_cbor")

# The KV block size Beluga runs vLLM's CPU engines with (vLLM's CPU default is 128). A cache of full blocks
# (vLLM's own prefix cache) makes its reader recompute the prompt's last partial block; at 32 tokens (the
# smallest block vLLM's fast CPU attention takes) that tail is 4x shorter: a 2,000-token hit measured
# 0.17 s TTFT against 0.45 s, with the same prefill and decode speed. (The pool also keeps prompt tails:
# see `connector.tail_key`.) GPU engines keep vLLM's default (16).
CPU_BLOCK_TOKENS = 32


def hash_domain(algo: str, seed: str) -> str:
    return hashlib.sha256(f"{algo}:{seed}".encode()).hexdigest()[:16]


def kv_format(model_id: str, layers: int, kv_heads: int, head_dim: int, block_tokens: int, dtype: str,
              layout: str, hash_algo: str, hash_seed: str, tp_size: int = 1, pp_size: int = 1) -> KVFormat:
    """`layers` and `kv_heads` are one rank's: a pipeline stage's layers, a tensor-parallel shard's heads."""
    return KVFormat(model=model_id, dtype=dtype, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                    block_tokens=block_tokens, layout=layout, hash_domain=hash_domain(hash_algo, hash_seed),
                    tp_size=tp_size, pp_size=pp_size)


def from_model_dir(model_dir: str | Path, block_tokens: int = CPU_BLOCK_TOKENS, dtype: str = "float32",
                   layout: str = "cpu", hash_algo: str = "sha256_cbor", hash_seed: str = "0",
                   model_id: str | None = None, tp_size: int = 1, pp_size: int = 1) -> KVFormat:
    """The format for a Hugging Face model folder (what `beluga serve` creates its pool with), as one rank
    of `tp_size` x `pp_size` engines sees it (vLLM's split: KV heads over TP, layers over PP)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    layers = cfg["num_hidden_layers"]
    if kv_heads % tp_size or layers % pp_size:
        raise ValueError(f"{kv_heads} KV heads and {layers} layers do not split evenly over TP {tp_size} x PP "
                         f"{pp_size}")
    return kv_format(model_id or model_id_for(model_dir), layers // pp_size, kv_heads // tp_size, head_dim,
                     block_tokens, dtype, layout, hash_algo, hash_seed, tp_size, pp_size)


def model_id_for(model: str | Path, revision: str | None = None) -> str:
    """The model's identity in the KV format: its content, not its folder's name (two folders named alike
    may hold different weights, and one model may sit in folders of different names). For a local folder:
    the name and a fingerprint of config.json and the weight files; for a hub id: the id and its revision."""
    path = Path(str(model).rstrip("/"))
    if path.is_dir():
        return f"{path.name[:60]}@{fingerprint(path)}"
    return f"{str(model)[:60]}@{(revision or 'unpinned')[:32]}"


SAMPLE_BYTES = 1 << 16
WHOLE_FILE_BYTES = 64 << 20


def fingerprint(model_dir: Path) -> str:
    """16 hex digits over the config and weights. Files up to 64 MB are hashed whole; larger ones by size,
    header and 64 samples spread over them (a fine-tune changes nearly every tensor), so a 64 GB model
    costs milliseconds at every engine start, not minutes."""
    h = hashlib.sha256()
    files = [model_dir / "config.json"] + sorted(
        p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_FILE_BYTES:
                h.update(fh.read())
                continue
            for i in range(64):
                fh.seek((size - SAMPLE_BYTES) * i // 63)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]
