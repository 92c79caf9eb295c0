"""Which prompts get a tail key (the pool's copy of a prompt's last, partial block), on vLLM's own Request
objects and block hasher. Engines reusing tails end to end: tests/test_engines.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

from beluga.workers.connector import BelugaConnector, tail_key
from beluga.workers.kvformat import CPU_BLOCK_TOKENS as BLOCK

HASH = get_hash_fn_by_name("sha256_cbor")


@pytest.fixture(autouse=True, scope="module")
def _none_hash():
    init_none_hash(HASH)  # what an engine does at start-up: the root of every block-hash chain


def request(tokens: list[int], salt: str | None = None, **extra) -> Request:
    return Request("r", tokens, SamplingParams(max_tokens=4), None, cache_salt=salt,
                   block_hasher=get_request_block_hasher(BLOCK, HASH), **extra)


def tail_of(req: Request) -> bytes | None:
    return BelugaConnector._tail(SimpleNamespace(block_size=BLOCK), req)


PROMPT = list(range(100, 100 + 3 * BLOCK + 7))  # three full blocks and a 7-token tail


def test_the_tail_key_names_the_prefix_and_the_tail_tokens():
    key = tail_of(request(PROMPT))
    assert key == tail_key(bytes(request(PROMPT).block_hashes[2]), PROMPT[3 * BLOCK:])
    assert key == tail_of(request(PROMPT))  # the same prompt in another request, another engine
    assert key != tail_of(request(PROMPT[:-1] + [5]))  # another last token
    assert key != tail_of(request([1] + PROMPT[1:]))  # the same tail after another prefix
    assert key != tail_of(request(PROMPT, salt="tenant-b"))  # the salt is in the first block's hash
    assert key not in {bytes(h) for h in request(PROMPT).block_hashes}


@pytest.mark.parametrize("tokens, extra", [
    (list(range(4 * BLOCK)), {}),  # ends on a block boundary: no partial block
    (list(range(BLOCK - 3)), {}),  # shorter than a block: nothing before the tail to chain it to
    (PROMPT, {"lora_request": LoRARequest("adapter", 1, "/nowhere")}),  # vLLM hashes the adapter too
])
def test_prompts_without_a_tail_key(tokens, extra):
    assert tail_of(request(tokens, **extra)) is None
