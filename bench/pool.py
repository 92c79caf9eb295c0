"""bench/pool.py: the pool's RPC, data-path, index and cache-line numbers beside their references.

    python bench/pool.py --json      (same as `beluga pool bench --json`)
"""

import sys

from beluga.cli import app

if __name__ == "__main__":
    sys.exit(app(["pool", "bench", *sys.argv[1:]]))
