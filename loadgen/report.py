"""What a replay writes: summary.json, requests.csv, outputs.jsonl and two plots; and `compare`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from beluga.loadgen.client import Result

SUMMARY_KEYS = ("pass", "requests", "errors", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
                "tpot_mean_s", "tpot_p99_s", "e2e_mean_s", "qps", "cached_tokens", "prompt_tokens")


def _stat(values: list[float], fn) -> float | None:
    v = [x for x in values if x == x and not math.isinf(x)]
    return float(fn(np.array(v))) if v else None


def summarize(results: list[Result], walls: dict[int, float]) -> list[dict]:
    out = []
    for p in sorted(walls):
        rs = [r for r in results if r.pass_ == p]
        ok = [r for r in rs if r.ok]
        ttft, tpot = [r.ttft_s for r in ok], [r.tpot_s for r in ok]
        out.append({
            "pass": p, "requests": len(rs), "errors": len(rs) - len(ok),
            "ttft_mean_s": _stat(ttft, np.mean), "ttft_p50_s": _stat(ttft, lambda a: np.percentile(a, 50)),
            "ttft_p90_s": _stat(ttft, lambda a: np.percentile(a, 90)),
            "ttft_p99_s": _stat(ttft, lambda a: np.percentile(a, 99)),
            "tpot_mean_s": _stat(tpot, np.mean), "tpot_p99_s": _stat(tpot, lambda a: np.percentile(a, 99)),
            "e2e_mean_s": _stat([r.e2e_s for r in ok], np.mean),
            "qps": len(ok) / walls[p] if walls[p] > 0 else None,
            "cached_tokens": sum(r.cached_tokens for r in ok), "prompt_tokens": sum(r.prompt_tokens for r in ok),
        })
    return out


def write(out: str | Path, results: list[Result], walls: dict[int, float], meta: dict, plots: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**meta, "passes": summarize(results, walls)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "requests.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Result("", 0).row()))
        w.writeheader()
        for r in results:
            w.writerow(r.row())
    with (out / "outputs.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps({"pass": r.pass_, "id": r.id, "text": r.text, "top_logprobs": r.top_logprobs}) + "\n")
    if plots:
        _plots(out, results, summary["passes"])
    return summary


def _plots(out: Path, results: list[Result], passes: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in passes:
        v = np.sort([r.ttft_s for r in results if r.pass_ == p["pass"] and r.ok])
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=f"pass {p['pass']}")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    names = [f"pass {p['pass']}" for p in passes]
    axes[0].bar(names, [p["ttft_mean_s"] or 0 for p in passes], color="#4a7ab5")
    axes[0].set_title("mean TTFT (s)")
    axes[1].bar(names, [p["qps"] or 0 for p in passes], color="#5aa469")
    axes[1].set_title("throughput (requests/s)")
    fig.tight_layout()
    fig.savefig(out / "passes.png", dpi=100)
    plt.close(fig)


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def compare(dirs: list[str | Path]) -> str:
    """A markdown table of several runs side by side (the paper's Table 5 columns)."""
    lines = ["| run | pass | requests | errors | TTFT mean (s) | TTFT p99 (s) | TPOT mean (s) | TPOT p99 (s) | QPS "
             "| cached tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in dirs:
        p = Path(d) / "summary.json"
        if not p.exists():
            raise FileNotFoundError(f"{p}: no summary.json (is {d} a replay output folder?)")
        s = json.loads(p.read_text())
        name = s.get("name") or Path(d).name
        for ps in s["passes"]:
            lines.append(f"| {name} | {ps['pass']} | {ps['requests']} | {ps['errors']} | {_fmt(ps['ttft_mean_s'])} | "
                         f"{_fmt(ps['ttft_p99_s'])} | {_fmt(ps['tpot_mean_s'], 4)} | {_fmt(ps['tpot_p99_s'], 4)} | "
                         f"{_fmt(ps['qps'])} | {ps['cached_tokens']} |")
    return "\n".join(lines)
