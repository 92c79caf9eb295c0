"""One streamed OpenAI request, timed: time to first token, time per output token, end to end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    id: str
    pass_: int
    ok: bool = False
    error: str = ""
    ttft_s: float = float("nan")
    tpot_s: float = float("nan")
    e2e_s: float = float("nan")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker: str = ""
    text: str = ""
    top_logprobs: list = field(default_factory=list)

    def row(self) -> dict:
        return {"pass": self.pass_, "id": self.id, "ok": self.ok, "error": self.error, "ttft_s": self.ttft_s,
                "tpot_s": self.tpot_s, "e2e_s": self.e2e_s, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "worker": self.worker}


async def stream_request(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int, rid: str,
                         pass_: int, api_key: str | None = None, endpoint: str = "completions",
                         logprobs: int = 0, extra: dict | None = None) -> Result:
    res = Result(rid, pass_)
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}, **(extra or {})}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        if logprobs:
            body.update(logprobs=True, top_logprobs=logprobs)
    else:
        body["prompt"] = prompt
        if logprobs:
            body["logprobs"] = logprobs
    # x-beluga-debug: the router then names the worker that answered (requests.csv's `worker` column).
    headers = {"x-beluga-debug": "1"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", f"{base}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                                 json=body, headers=headers) as r:
            res.worker = r.headers.get("x-beluga-worker", "")
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")[:300]
                res.error = f"HTTP {r.status_code}: {detail}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    res.error = str(d["error"].get("message", d["error"]))
                    return res
                for ch in d.get("choices") or []:
                    piece = ch.get("text") if endpoint != "chat" else (ch.get("delta") or {}).get("content")
                    if piece is None:
                        continue
                    now = time.perf_counter()
                    if res.ttft_s != res.ttft_s:  # first token
                        res.ttft_s = now - t0
                    last = now
                    res.text += piece
                    res.top_logprobs += _top(ch, endpoint)
                if d.get("usage"):
                    u = d["usage"]
                    res.prompt_tokens = u.get("prompt_tokens", 0)
                    res.completion_tokens = u.get("completion_tokens", 0)
                    res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e_s = time.perf_counter() - t0
    if res.completion_tokens > 1 and res.ttft_s == res.ttft_s:
        res.tpot_s = (last - t0 - res.ttft_s) / (res.completion_tokens - 1)
    res.ok = res.ttft_s == res.ttft_s
    return res


def _top(choice: dict, endpoint: str) -> list:
    lp = choice.get("logprobs")
    if not lp:
        return []
    if endpoint == "chat":
        return [{t["token"]: t["logprob"] for t in c.get("top_logprobs", [])} for c in lp.get("content") or []]
    return list(lp.get("top_logprobs") or [])
