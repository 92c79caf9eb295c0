"""`beluga`: the command line. Each component adds its subcommands here; the logic lives in the component."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from beluga.workers.kvformat import CPU_BLOCK_TOKENS

app = typer.Typer(help="Beluga-KV: a shared KV-cache pool for vLLM fleets.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
model_app = typer.Typer(help="The bundled model (SmolLM2-135M-Instruct).", no_args_is_help=True)
pool_app = typer.Typer(help="The shared KV pool and its metadata server.", no_args_is_help=True)
app.add_typer(model_app, name="model")
loadgen_app = typer.Typer(help="LV-Eval replay load generator.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
app.add_typer(loadgen_app, name="loadgen")
console = Console(stderr=True)


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@app.callback()
def main_callback(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False):
    _logging(verbose)


# -- model --------------------------------------------------------------------------------------------
@model_app.command("prepare")
def model_prepare(out: Annotated[Path | None, typer.Option(help="folder (default: the cache)")] = None,
                  force: bool = False):
    """Convert the bundled GGUF into a float32 Hugging Face folder, verify it, print its path."""
    from beluga import model

    with console.status("preparing the bundled model (dequantize, save, verify)"):
        path = model.prepare(out, force)
    print(path)


@model_app.command("path")
def model_path():
    """Print where the prepared model is (fails if it is not prepared)."""
    from beluga import model

    try:
        print(model.path_or_raise())
    except RuntimeError as e:
        _fail(str(e))


# -- pool ---------------------------------------------------------------------------------------------
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
PathOpt = Annotated[list[str] | None, typer.Option("--path", help="pool file or /dev/dax node (repeat to "
                                                   "interleave)")]


def _pool_settings(path, **kw):
    from pydantic import ValidationError

    from beluga.cxlpool.settings import PoolSettings

    kw = {k: v for k, v in kw.items() if v is not None}
    if path:
        kw["path"] = path
    try:
        return PoolSettings(**kw)
    except ValidationError as e:
        _fail(f"bad pool settings: {e}")


def _format_for(model_dir: str | None, block_tokens: int, dtype: str, layout: str, hash_seed: str,
                tp_size: int = 1, pp_size: int = 1):
    from beluga import model
    from beluga.workers.kvformat import from_model_dir

    try:
        return from_model_dir(model_dir or model.path_or_raise(), block_tokens, dtype, layout,
                              hash_seed=hash_seed, tp_size=tp_size, pp_size=pp_size)
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        _fail(f"cannot derive the KV format: {e}")


CoherenceOpt = Annotated[str | None, typer.Option(help="coherent (one host), native (CXL shared by hosts), "
                                                   "simulated (tests); at serve: must match the pool's")]
TransportsOpt = Annotated[str | None, typer.Option(help="what the server serves: shm,tcp (default) or tcp "
                                                   "(hosts whose RPC area is not coherent)")]
TokenOpt = Annotated[str | None, typer.Option(help="the pool token file (TCP); default: beside the pool")]
ParallelOpt = Annotated[int, typer.Option(min=1, help="the engines' tensor- / pipeline-parallel size")]


@pool_app.command("create")
def pool_create(path: PathOpt = None, size: Annotated[str, typer.Option(help="bytes, or 512M, 4G")] = "1G",
                model_dir: Annotated[str | None, typer.Option(help="HF model folder (default: bundled)")] = None,
                block_tokens: int = CPU_BLOCK_TOKENS, dtype: str = "float32", layout: str = "cpu",
                hash_seed: str = "0", clients: int = 64, group_access: bool = False,
                coherence: CoherenceOpt = None, transports: TransportsOpt = None, token_file: TokenOpt = None,
                tp_size: ParallelOpt = 1, pp_size: ParallelOpt = 1, as_json: JsonOpt = False):
    """Create and format a pool for a model's KV format, and its token (a pool is created once)."""
    from beluga.cxlpool import pool as pool_mod

    s = _pool_settings(path, size=parse_size(size), clients=clients, group_access=group_access,
                       coherence=coherence, transports=transports and [transports], token_file=token_file)
    fmt = _format_for(model_dir, block_tokens, dtype, layout, hash_seed, tp_size, pp_size)
    try:
        p = pool_mod.create(s, fmt)
    except Exception as e:  # noqa: BLE001 - shown to the user as is
        _fail(str(e))
    info = {"path": s.path, "slots": p.geo.n_slots, "slot_bytes": p.geo.slot_bytes, "format": fmt.describe(),
            "coherence": p.svc.coherence, "transports": list(p.svc.transports),
            "token_file": s.token_path() if "tcp" in p.svc.transports else None}
    print(json.dumps(info) if as_json else f"created {s.path}: {p.geo.n_slots} slots of {p.geo.slot_bytes} B, "
          f"{p.svc.coherence}, serving {'+'.join(p.svc.transports)}")


@pool_app.command("status")
def pool_status(path: PathOpt = None, admin_port: int = 7700, as_json: JsonOpt = False):
    """Show a pool's format and, if its metadata server runs, its live statistics."""
    import httpx

    from beluga.cxlpool import pool as pool_mod

    s = _pool_settings(path, admin_port=admin_port)
    try:
        p = pool_mod.attach(s)
    except Exception as e:  # noqa: BLE001
        _fail(str(e))
    info = {"path": s.path, "slots": p.geo.n_slots, "slot_bytes": p.geo.slot_bytes, "format": p.fmt.describe(),
            "coherence": p.svc.coherence, "transports": list(p.svc.transports)}
    try:
        info["server"] = httpx.get(f"http://{s.admin_host}:{s.admin_port}/stats", timeout=2).json()
    except httpx.HTTPError:
        info["server"] = None
    print(json.dumps(info, indent=None if as_json else 2))


@pool_app.command("serve")
def pool_serve(path: PathOpt = None, size: str = "1G", create: Annotated[bool, typer.Option(
               help="create the pool for the bundled model (or --model-dir) if it does not exist")] = True,
               model_dir: str | None = None, block_tokens: int = CPU_BLOCK_TOKENS, dtype: str = "float32",
               layout: str = "cpu", hash_seed: str = "0", coherence: CoherenceOpt = None,
               transports: TransportsOpt = None, token_file: TokenOpt = None, tp_size: ParallelOpt = 1,
               pp_size: ParallelOpt = 1, eviction: str = "s3fifo", tcp_host: str | None = None,
               tcp_port: int = 7701, admin_host: str | None = None, admin_port: int = 7700, spin_us: int = 200,
               heartbeat_timeout_s: float | None = None,
               as_json: Annotated[bool, typer.Option("--json", help="print the endpoints as JSON")] = False):
    """Run the metadata server (shared-memory RPC, TCP, admin HTTP) until Ctrl-C."""
    from beluga.cxlpool.server import service

    s = _pool_settings(path, size=parse_size(size), coherence=coherence, transports=transports and [transports],
                       token_file=token_file, eviction=eviction, tcp_host=tcp_host, tcp_port=tcp_port,
                       admin_host=admin_host, admin_port=admin_port, spin_us=spin_us,
                       heartbeat_timeout_s=heartbeat_timeout_s)
    fmt = _format_for(model_dir, block_tokens, dtype, layout, hash_seed, tp_size, pp_size) if create else None
    if as_json:
        print(json.dumps({"path": s.path, "tcp_port": tcp_port, "admin_port": admin_port}), flush=True)
    try:
        service.run(s, fmt)
    except Exception as e:  # noqa: BLE001
        _fail(str(e))


@pool_app.command("bench")
def pool_bench(as_json: JsonOpt = False, quick: bool = False):
    """Measure RPC latency (shm vs TCP), block write/read bandwidth, lookups, cache-line costs."""
    from beluga.cxlpool import bench

    with console.status("benchmarking the pool (RPC, block copies, a 1,000,000-block index, cache lines)"):
        result = bench.run(quick=quick)
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")


# -- serve, router, worker ------------------------------------------------------------------------------
@app.command("serve")
def serve(workers: int = 2, policy: str = "least-loaded", pool: str = "/dev/shm/beluga-pool",
          pool_size: str = "4G", no_pool: Annotated[bool, typer.Option("--no-pool", help="plain vLLM workers: "
                                                                        "the baseline")] = False,
          model: Annotated[str | None, typer.Option(help="HF model folder (default: bundled)")] = None,
          host: str = "127.0.0.1", port: int = 8000, worker_base_port: int = 8100, kv_space_gb: int = 1,
          ray_address: str | None = None, log_dir: str = "/tmp/beluga-logs", pool_admin_port: int = 7700,
          pool_tcp_port: int = 7701,
          kv_transfer_config: Annotated[str | None, typer.Option(help="JSON: another KV connector for every "
                                                                 "worker (to compare a peer); no Beluga pool")] = None,
          optimization_level: Annotated[int, typer.Option("-O", help="vLLM's -O level for the workers")] = 0,
          block_size: Annotated[int, typer.Option(help="the workers' KV block size (and the pool's)")] =
          CPU_BLOCK_TOKENS):
    """Pool + metadata server + Ray-managed vLLM workers + router, on this machine, until Ctrl-C."""
    from pydantic import ValidationError

    from beluga.serve import ServeSettings, run

    try:
        s = ServeSettings(workers=workers, policy=policy, pool=pool, pool_size=parse_size(pool_size),
                          no_pool=no_pool, model=model, host=host, port=port, worker_base_port=worker_base_port,
                          kv_space_gb=kv_space_gb, ray_address=ray_address, log_dir=log_dir,
                          pool_admin_port=pool_admin_port, pool_tcp_port=pool_tcp_port,
                          kv_transfer_config=json.loads(kv_transfer_config) if kv_transfer_config else None,
                          optimization_level=optimization_level, block_size=block_size)
        from beluga.router import policies

        policies.make(policy)
    except (ValidationError, ValueError) as e:  # JSONDecodeError is a ValueError
        _fail(str(e))
    try:
        run(s, console)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:
        _fail(str(e))


@app.command("router")
def router(host: str = "127.0.0.1", port: int = 8000, policy: str = "least-loaded",
           discovery: Annotated[str, typer.Option(help="static, dns or ray")] = "static",
           worker: Annotated[list[str] | None, typer.Option(help="static worker URL (repeat)")] = None,
           dns_name: str | None = None, dns_port: int = 8000, ray_address: str | None = None,
           api_keys_file: Annotated[str | None, typer.Option(help="'key tenant' lines: keys on")] = None,
           admin_api_keys_file: Annotated[str | None, typer.Option(help="keys for /workers and /metrics "
                                                                   "only, one a line")] = None,
           worker_api_key_file: Annotated[str | None, typer.Option(help="the workers' key (vLLM's --api-key), "
                                                                   "sent to them on every request")] = None):
    """Run only the router (Kubernetes, or in front of workers started elsewhere). Every other setting:
    BELUGA_ROUTER_* environment variables (router/settings.py)."""
    import uvicorn
    from pydantic import ValidationError

    from beluga.router.app import create_app
    from beluga.router.limits import uvicorn_config
    from beluga.router.settings import RouterSettings

    try:
        kw = dict(host=host, port=port, policy=policy, discovery=discovery, dns_name=dns_name,
                  dns_port=dns_port, ray_address=ray_address)
        given = dict(workers=worker, api_keys_file=api_keys_file, admin_api_keys_file=admin_api_keys_file,
                     worker_api_key_file=worker_api_key_file)
        kw.update({k: v for k, v in given.items() if v})  # unset flags leave BELUGA_ROUTER_* in charge
        rs = RouterSettings(**kw)
        app_ = create_app(rs)
    except (ValidationError, ValueError, OSError) as e:
        _fail(str(e))
    uvicorn.Server(uvicorn_config(app_, rs)).run()


@app.command("worker")
def worker_cmd(pool: Annotated[str | None, typer.Option(help="pool path; none: no connector")] = None,
               model: str | None = None, host: str = "127.0.0.1", port: int = 8000, cores: str | None = None,
               kv_space_gb: int = 1, device: str = "cpu", pool_tcp_port: int = 7701,
               connector_extra: Annotated[str, typer.Option(help="JSON merged into the connector's "
                                                            "kv_connector_extra_config")] = "{}",
               block_size: Annotated[int | None, typer.Option(help="KV block size; must be the pool's "
                                                              "(default: 32 on the CPU, vLLM's on GPUs)")] = None):
    """Run one vLLM worker with the connector in the foreground (one per pod on Kubernetes)."""
    from beluga import model as model_mod
    from beluga.workers.connector import connector_config
    from beluga.workers.engine import EngineProcess, EngineSettings

    try:
        extra = json.loads(connector_extra)
        if not isinstance(extra, dict):
            raise ValueError("must be a JSON object")
    except ValueError as e:
        _fail(f"--connector-extra is not a JSON object: {e}")
    s = EngineSettings(model=model or str(model_mod.path_or_raise()), host=host, port=port, cores=cores,
                       kv_space_gb=kv_space_gb, device=device, block_size=block_size,
                       connector=connector_config(pool, tcp_port=pool_tcp_port, **extra) if pool else None)
    e = EngineProcess(s).start()
    try:
        e.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        e.stop()


# -- loadgen ------------------------------------------------------------------------------------------
@loadgen_app.command("synth")
def loadgen_synth(out: Annotated[Path, typer.Option(help="output folder")],
                  subsets: Annotated[list[str] | None, typer.Option("--subsets", help="repeat per subset")] = None,
                  rows: int = 8, length: str = "16k", seed: int = 0,
                  words: Annotated[int | None, typer.Option(help="context words (default: the level's)")] = None):
    """Write synthetic data in LV-Eval's own layout."""
    from beluga.loadgen import synth

    try:
        for p in synth.write(out, subsets, rows, length, seed, words):
            print(p)
    except ValueError as e:
        _fail(str(e))


@loadgen_app.command("replay")
def loadgen_replay(target: Annotated[str, typer.Option(help="OpenAI-compatible base URL")],
                   data: Annotated[str, typer.Option(help="LV-Eval folder")],
                   out: Annotated[str, typer.Option(help="output folder")],
                   subsets: Annotated[list[str] | None, typer.Option("--subsets")] = None, length: str = "16k",
                   passes: int = 2, concurrency: int | None = None, qps: float | None = None,
                   max_input_tokens: int = 4000, max_tokens: int = 16, model: str | None = None,
                   api_key: str | None = None, limit: int | None = None, tokenizer: str | None = None,
                   endpoint: str = "completions", seed: int = 0, logprobs: int = 0,
                   score: Annotated[bool, typer.Option("--score")] = False, name: str | None = None):
    """Replay LV-Eval against an endpoint in passes; writes summary.json, requests.csv and plots."""
    from pydantic import ValidationError

    from beluga.loadgen import replay
    from beluga.loadgen.dataset import DataError

    try:
        s = replay.ReplaySettings(target=target, data=data, out=out, subsets=subsets, length=length, passes=passes,
                                  concurrency=concurrency, qps=qps, max_input_tokens=max_input_tokens,
                                  max_tokens=max_tokens, model=model, api_key=api_key, limit=limit,
                                  tokenizer=tokenizer, endpoint=endpoint, seed=seed, logprobs=logprobs,
                                  do_score=score, name=name)
        summary = replay.run(s)
    except (ValidationError, DataError, replay.TargetError) as e:
        _fail(str(e))
    print(json.dumps(summary["passes"], indent=1))


@loadgen_app.command("compare")
def loadgen_compare(dirs: list[str]):
    """A markdown table of several replay outputs side by side."""
    from beluga.loadgen import report

    try:
        print(report.compare(dirs))
    except FileNotFoundError as e:
        _fail(str(e))


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        _fail(f"bad size {text!r}: use bytes or a number with K, M, G, T")


def main() -> None:
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored; our
    # commands promise that Ctrl-C (or SIGINT) stops them cleanly, so take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    app()


if __name__ == "__main__":
    main()
