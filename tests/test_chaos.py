"""The short chaos schedule (bench/chaos.py) under load, with real engines: the metadata server killed and
stopped, committed blocks corrupted, the pool filled to its limit, a worker hung for 10 s, the router
restarted. Nothing wrong is ever served and no committed block is lost; failures happen only while a
fault is active. The full schedule (worker and engine kills too) is the benchmark's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import chaos  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def test_short_chaos_serves_nothing_wrong(tmp_path):
    r = chaos.main(["--schedule", "short", "--gap-s", "8", "--docs", "4", "--out", str(tmp_path)])
    assert r["wrong_outputs"] == 0
    assert r["succeeded"] > 100 and r["failed_otherwise"] == []
    kill = next(f for f in r["faults"] if f["name"] == "kill_server")
    assert kill["notes"]["committed_after"] == kill["notes"]["committed_before"] > 0
    assert kill["notes"]["server_back_s"] < 5  # under load on two cores; 0.7 s idle (test_serve: < 2 s)
    assert all(f["recovered_s"] is not None for f in r["faults"]), r["faults"]
    stop = next(f for f in r["faults"] if f["name"] == "stop_worker")
    assert stop["notes"]["ejected_after_s"] is not None  # the hung worker was taken out of rotation
