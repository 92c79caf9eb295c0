"""Replay LV-Eval against any OpenAI-compatible endpoint, in passes (populate, then warm), closed or open loop.

Pass 1 sends every request once; pass 2 sends the same requests again in a new shuffled order, as the
Beluga paper's warm-pool run: LV-Eval rows share no context, so reuse comes from the schedule.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import BaseModel, Field, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from beluga.loadgen import dataset, report
from beluga.loadgen.client import Result, stream_request
from beluga.loadgen.score import score

log = logging.getLogger(__name__)


class ReplaySettings(BaseModel):
    target: str
    data: str
    out: str
    subsets: list[str] | None = None
    length: str = "16k"
    passes: int = Field(2, ge=1, le=10)
    concurrency: int | None = Field(None, ge=1)
    qps: float | None = Field(None, gt=0)
    max_input_tokens: int = Field(4000, gt=0)
    max_tokens: int = Field(16, ge=1)
    model: str | None = None
    api_key: str | None = None
    limit: int | None = Field(None, ge=1)
    tokenizer: str | None = Field(None, description="tokenizer folder (default: the bundled model)")
    endpoint: str = Field("completions", pattern="^(completions|chat)$")
    seed: int = 0
    logprobs: int = Field(0, ge=0, le=5)
    do_score: bool = False
    name: str | None = None
    timeout_s: float = Field(600, gt=0)

    @model_validator(mode="after")
    def _loop(self):
        if self.concurrency and self.qps:
            raise ValueError("give --concurrency (closed loop) or --qps (open loop), not both")
        if not self.concurrency and not self.qps:
            self.concurrency = 1
        return self


@dataclass
class Request:
    row: dataset.Row
    prompt: str


class TargetError(RuntimeError):
    """The endpoint cannot be reached or does not serve the model."""


def truncate_middle(tokenizer, prompt: str, max_tokens: int) -> str:
    """LongBench-style: keep the first and last halves of the tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:],
                                                                                      skip_special_tokens=True)


def prepare(s: ReplaySettings) -> list[Request]:
    from transformers import AutoTokenizer

    rows = dataset.read(s.data, s.subsets, s.length)
    if s.limit:
        rows = rows[: s.limit]
    tok_path = s.tokenizer
    if tok_path is None:
        from beluga import model

        tok_path = str(model.path_or_raise())
    tok = AutoTokenizer.from_pretrained(tok_path)
    return [Request(r, truncate_middle(tok, dataset.build_prompt(r), s.max_input_tokens)) for r in rows]


async def check_target(client: httpx.AsyncClient, s: ReplaySettings) -> str:
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    try:
        r = await client.get(s.target.rstrip("/") + "/v1/models", headers=headers, timeout=5)
    except httpx.HTTPError as e:
        raise TargetError(f"cannot reach {s.target}: {type(e).__name__} {e}; is the server running?") from e
    if r.status_code != 200:
        raise TargetError(f"{s.target}/v1/models answered {r.status_code}: {r.text[:200]}")
    models = [m["id"] for m in r.json().get("data", [])]
    if s.model:
        if models and s.model not in models:
            raise TargetError(f"{s.target} does not serve {s.model!r}; it serves {models}")
        return s.model
    if not models:
        raise TargetError(f"{s.target} lists no model; pass --model")
    return models[0]


async def _run_pass(client, s: ReplaySettings, model: str, reqs: list[Request], pass_no: int, results: list[Result],
                    progress: Progress) -> float:
    order = list(reqs)
    random.Random(f"{s.seed}/{pass_no}").shuffle(order)
    task = progress.add_task(f"pass {pass_no}", total=len(order))
    base = s.target.rstrip("/")

    async def one(req: Request):
        r = await stream_request(client, base, model, req.prompt, s.max_tokens, req.row.id, pass_no, s.api_key,
                                 s.endpoint, s.logprobs)
        results.append(r)
        progress.advance(task)

    t0 = time.perf_counter()
    if s.qps:
        rng = random.Random(f"{s.seed}/arrivals/{pass_no}")
        tasks = []
        for req in order:
            tasks.append(asyncio.create_task(one(req)))
            await asyncio.sleep(rng.expovariate(s.qps))
        await asyncio.gather(*tasks)
    else:
        queue = list(reversed(order))

        async def loop():
            while queue:
                await one(queue.pop())

        await asyncio.gather(*(loop() for _ in range(s.concurrency)))
    return time.perf_counter() - t0


async def _replay(s: ReplaySettings, reqs: list[Request], results: list[Result], walls: dict[int, float]) -> str:
    limits = httpx.Limits(max_connections=max(s.concurrency or 64, 64))
    async with httpx.AsyncClient(timeout=httpx.Timeout(s.timeout_s, connect=5), limits=limits) as client:
        model = await check_target(client, s)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=False) as progress:
            for p in range(1, s.passes + 1):
                walls[p] = float("nan")
                walls[p] = await _run_pass(client, s, model, reqs, p, results, progress)
    return model


def run(s: ReplaySettings) -> dict:
    """Run the replay; on Ctrl-C, write what was measured so far. Returns the summary."""
    reqs = prepare(s)
    results: list[Result] = []
    walls: dict[int, float] = {}
    model = s.model
    interrupted = False
    started = time.perf_counter()
    try:
        model = asyncio.run(_replay(s, reqs, results, walls))
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: writing the %d results measured so far", len(results))
        for p, w in walls.items():
            if w != w:
                walls[p] = time.perf_counter() - started - sum(x for x in walls.values() if x == x)
    if s.do_score:
        by_id = {r.row.id: r.row for r in reqs}
        for r in results:
            row = by_id[r.id]
            r.score = score(r.text, row.answers, row.answer_keywords, row.language)  # type: ignore[attr-defined]
    meta = {"name": s.name or Path(s.out).name, "target": s.target, "model": model, "length": s.length,
            "max_input_tokens": s.max_input_tokens, "concurrency": s.concurrency, "qps_target": s.qps,
            "interrupted": interrupted}
    if s.do_score:
        scored = [getattr(r, "score", 0.0) for r in results if r.ok]
        meta["score_mean"] = sum(scored) / len(scored) if scored else None
    return report.write(s.out, results, walls, meta)
