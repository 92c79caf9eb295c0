"""Packaging and configuration checks that need no server."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from beluga.workers.connector import ConnectorSettings, check_hashing
from beluga.workers.kvformat import hash_domain


def test_import_names_are_namespaced():
    for name in ("beluga.cxlpool", "beluga.kernels", "beluga.workers", "beluga.router", "beluga.loadgen"):
        importlib.import_module(name)
    assert md.distribution("beluga-kv").read_text("top_level.txt").split() == ["beluga"]
    # From outside the checkout, no bare name resolves to one of our folders.
    repo = str(Path(__file__).resolve().parents[1])
    code = ("import importlib.util as u; print([n for n in ('kernels', 'router', 'workers', 'cxlpool', 'loadgen') "
            f"if (s := u.find_spec(n)) and s.origin and s.origin.startswith({repo!r})])")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("algo,seed", [("sha256_cbor", None), ("xxhash", "0"), ("sha256", "random")])
def test_connector_refuses_hashing_that_differs_between_processes(algo, seed):
    with pytest.raises(ValueError, match="PYTHONHASHSEED=0"):
        check_hashing(algo, seed)
    check_hashing("sha256_cbor", "0")


def test_hash_seed_is_part_of_the_pool_format():
    assert hash_domain("sha256_cbor", "0") != hash_domain("sha256_cbor", "1")


def test_connector_config_errors_are_clear():
    with pytest.raises(ValueError, match="pool"):
        ConnectorSettings()
    with pytest.raises(ValueError, match="extra"):
        ConnectorSettings(pool="/dev/shm/x", colour="blue")
