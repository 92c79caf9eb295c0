"""bench/pool.py: the pool's RPC, data-path, index and cache-line numbers beside their references.

    python bench/pool.py --json                    (same as `beluga pool bench --json`)
    python bench/pool.py --json --before 5b20555   (and the RPC of an earlier revision, in the same run)

`--before REV` checks REV out into a temporary worktree and measures its shared-memory and TCP round trips
right after this tree's, on the same machine, so a change on the RPC path reports before and after side by
side (REV 5b20555 is the pool before session tokens, request checks and TCP authentication).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from beluga.cxlpool import bench

log = logging.getLogger("bench.pool")
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cxlpool", "kernels", "workers", "router", "loadgen")
RPC_KEYS = ("rpc_shm_p50_us", "rpc_shm_p99_us", "rpc_tcp_p50_us", "rpc_tcp_p99_us")


def rpc_of_revision(rev: str, quick: bool) -> dict:
    """Run REV's own RPC benchmark: its folders mapped onto the `beluga.*` names it imports."""
    with tempfile.TemporaryDirectory() as tmp:
        tree, shim = Path(tmp) / "tree", Path(tmp) / "shim" / "beluga"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            shim.mkdir(parents=True)
            for name in PACKAGES:
                (shim / name).symlink_to(tree / name)
            for f in (tree / "beluga").glob("*.py"):
                (shim / f.name).symlink_to(f)
            code = ("import json, sys; from beluga.cxlpool import bench; "
                    f"print(json.dumps(bench.rpc_and_data({quick})))")
            env = dict(os.environ, PYTHONPATH=str(shim.parent))
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                                 cwd=tmp)
            return json.loads(out.stdout.splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", help="a git revision whose RPC to measure in the same run")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = bench.run(a.quick)
    if a.before:
        old = rpc_of_revision(a.before, a.quick)
        out["before"] = {"revision": a.before, **{k: old[k] for k in RPC_KEYS}}
        out["after_vs_before"] = {k: out[k] / old[k] for k in RPC_KEYS}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
