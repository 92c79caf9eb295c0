"""Tensor parallel through the pool with real vLLM CPU engines at TP=2.

The bundled model has 3 KV heads, which two ranks cannot split, so this builds a small random-weight Llama
(2 KV heads, the bundled tokenizer; no download): its greedy output is gibberish, but deterministic, which
is all a comparison with and without the pool needs. Each rank stores its own shard under its own key;
before, both ranks saved under one key and both loaded the first rank's shard (wrong KV, valid checksum).
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import ServerProcess, free_port
from test_engines import complete, long_prompt

from beluga import model
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.settings import PoolSettings
from beluga.workers.connector import connector_config
from beluga.workers.engine import EngineProcess, EngineSettings
from beluga.workers.kvformat import CPU_BLOCK_TOKENS, from_model_dir

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = model.path_or_raise()
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=8192,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, torch_dtype="float32")
    LlamaForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    return d


def _engine(mdir, pool: str, tcp_port: int, log_file: str) -> EngineProcess:
    es = EngineSettings(model=str(mdir), port=free_port(), cores="0|1", kv_space_gb=1, max_model_len=4096,
                        log_file=log_file, extra_args=["--tensor-parallel-size", "2"],
                        connector=connector_config(pool, tcp_port=tcp_port))
    return EngineProcess(es)


def test_two_ranks_store_and_load_their_own_shards(tiny_llama, tmp_path):
    path = f"/dev/shm/beluga-tp-{free_port()}"
    s = PoolSettings(path=[path], size=256 << 20, tcp_port=free_port(), admin_port=free_port())
    pool_mod.create(s, from_model_dir(tiny_llama, tp_size=2)).close()
    srv = ServerProcess(s).start()
    prompt = long_prompt(1000, tag="tp")
    try:
        with _engine(tiny_llama, path, s.tcp_port, str(tmp_path / "a.log")) as a:
            _, text_a, usage_a = complete(a.settings.url, prompt)
        blocks = usage_a["prompt_tokens"] // CPU_BLOCK_TOKENS
        st = srv.stats()
        assert st["commits"] >= 2 * blocks and st["commits"] % 2 == 0  # one shard per rank and block
        with _engine(tiny_llama, path, s.tcp_port, str(tmp_path / "b.log")) as b:
            _, text_b, usage_b = complete(b.settings.url, prompt)
        assert usage_b["prompt_tokens_details"]["cached_tokens"] >= blocks * CPU_BLOCK_TOKENS
        assert text_b == text_a  # each rank loaded its own heads: the same greedy output as computing
    finally:
        srv.stop()
        for p in (path, path + ".bell", path + ".token"):
            if os.path.exists(p):
                os.unlink(p)


def test_an_engine_of_another_world_size_is_refused(tiny_llama, tmp_path):
    path = f"/dev/shm/beluga-tp-{free_port()}"
    s = PoolSettings(path=[path], size=64 << 20)
    pool_mod.create(s, from_model_dir(tiny_llama, tp_size=2)).close()
    try:
        es = EngineSettings(model=str(tiny_llama), port=free_port(), cores="0", kv_space_gb=1, max_model_len=4096,
                            log_file=str(tmp_path / "tp1.log"), connector=connector_config(path))
        e = EngineProcess(es).start()
        with pytest.raises(RuntimeError, match="exited"):
            e.wait_ready()
        log = (tmp_path / "tp1.log").read_text()
        assert "tp_size: pool has 2, engine has 1" in log
    finally:
        for p in (path, path + ".token"):
            if os.path.exists(p):
                os.unlink(p)
