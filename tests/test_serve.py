"""`beluga serve` as a user runs it: real pool server, real Ray, two real vLLM CPU workers, the router;
driven with the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
from conftest import free_port
from test_engines import long_prompt

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]
MODEL = "smollm2-135m-instruct"


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    port = free_port()
    base = next(b for b in iter(free_port, None) if b + 1 < 65536 and port not in (b, b + 1) and _free(b + 1))
    pool = f"/dev/shm/beluga-serve-{port}"
    admin = free_port()
    cmd = [sys.executable, "-m", "beluga", "serve", "--port", str(port), "--worker-base-port", str(base),
           "--pool", pool, "--pool-size", "2G", "--log-dir", str(logs), "--pool-admin-port", str(admin),
           "--pool-tcp-port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=open(logs / "serve.out", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, (logs / "serve.out").read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200 and len(
                    [w for w in httpx.get(url + "/workers").json() if w["healthy"]]) == 2:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("beluga serve did not become ready")
    descendants = psutil.Process(proc.pid).children(recursive=True)
    yield url, base, proc, f"http://127.0.0.1:{admin}"
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(120)
    time.sleep(3)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind after Ctrl-C: {[p.cmdline()[:3] for p in alive]}"
    for p in (pool, pool + ".bell", pool + ".token"):
        if os.path.exists(p):
            os.unlink(p)


@pytest.fixture(scope="module")
def client(serve):
    return openai.OpenAI(base_url=serve[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_client_chat_stream_completions_models(client):
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, stream=True,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert comp.choices[0].text
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)


def test_api_keys_on_gives_401_without_a_key(serve, tmp_path):
    url, base, *_ = serve
    keys = tmp_path / "keys"
    keys.write_text("sk-test tenant-a\n")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "beluga", "router", "--port", str(port), "--worker",
                          f"http://127.0.0.1:{base}", "--worker", f"http://127.0.0.1:{base + 1}", "--api-keys-file",
                          str(keys)])
    try:
        r_url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(r_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        bad = openai.OpenAI(base_url=r_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=r_url + "/v1", api_key="sk-test", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
    finally:
        p.terminate()
        p.wait(10)


def test_least_loaded_spreads_and_second_worker_hits_the_pool(client):
    prompt = long_prompt(1500, "router ")
    debug = {"x-beluga-debug": "1"}  # the router names its worker only when asked
    first = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                        extra_headers=debug)
    second = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                         extra_headers=debug)
    assert first.headers["x-beluga-worker"] != second.headers["x-beluga-worker"]
    a, b = first.parse(), second.parse()
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens >= 1280  # from the pool: B never saw this prompt
    assert a.choices[0].text == b.choices[0].text


def test_loadgen_replay_against_serve(serve, tmp_path):
    from beluga.loadgen import synth

    synth.write(tmp_path / "data", ["multifieldqa_en_mixup"], rows=3, words=900)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "beluga", "loadgen", "replay", "--target", serve[0], "--data",
                    str(tmp_path / "data"), "--out", str(out), "--max-input-tokens", "1000", "--concurrency", "2",
                    "--max-tokens", "4"], check=True, timeout=600)
    s = json.loads((out / "summary.json").read_text())
    p1, p2 = s["passes"]
    for p in (p1, p2):
        assert {"pass", "requests", "errors", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s",
                "e2e_mean_s", "qps", "cached_tokens"} <= set(p)
        assert p["requests"] == 3 and p["errors"] == 0 and p["qps"] > 0 and p["ttft_p99_s"] >= p["ttft_p50_s"]
    assert p2["cached_tokens"] > p1["cached_tokens"] and p2["ttft_mean_s"] < p1["ttft_mean_s"]
    assert (out / "ttft_cdf.png").stat().st_size > 1000 and (out / "requests.csv").read_text().count("\n") == 7

    # Ctrl-C in the middle of pass 1 (12 fresh prompts, one at a time): what was measured so far is written.
    synth.write(tmp_path / "data2", ["factrecall_en"], rows=12, words=900, seed=5)
    out2 = tmp_path / "out2"
    p = subprocess.Popen([sys.executable, "-m", "beluga", "loadgen", "replay", "--target", serve[0], "--data",
                          str(tmp_path / "data2"), "--out", str(out2), "--max-input-tokens", "1000", "--passes", "3"])
    time.sleep(20)
    p.send_signal(signal.SIGINT)
    p.wait(60)
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["interrupted"] is True and 0 < s2["passes"][0]["requests"] < 12


def test_sigkilled_pool_server_is_replaced_within_2s_with_every_block(serve, client):
    """`beluga serve` supervises its metadata server: a new one answers within 2 s of a SIGKILL, rebuilds its
    index from the slot headers (0 committed blocks lost), and the engines' clients carry on by themselves."""
    _, _, proc, admin = serve
    prompt = "Supervision keeps the pool answering. " * 60
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    before = httpx.get(admin + "/stats", timeout=5).json()["committed_blocks"]
    assert before > 0
    victim = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "pool" in p.cmdline() and "serve" in p.cmdline())
    victim.kill()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        try:
            if httpx.get(admin + "/health", timeout=0.5).status_code == 200 and not victim.is_running():
                break
        except httpx.HTTPError:
            time.sleep(0.02)
    took = time.monotonic() - t0
    assert took < 2.0, took
    assert httpx.get(admin + "/stats", timeout=5).json()["committed_blocks"] == before
    fresh = "After the restart, new blocks go to the new server. " * 60
    for _ in range(3):  # least-loaded: these reach both workers, the second loads from the pool
        client.completions.create(model=MODEL, prompt=fresh, max_tokens=2, temperature=0)
    st = httpx.get(admin + "/stats", timeout=5).json()
    assert st["commits"] > 0 and st["hit_blocks"] > 0


def test_sigkilled_worker_comes_back_by_itself(serve):
    url, base, *_ = serve
    victim = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == base
                  and c.status == psutil.CONN_LISTEN)
    os.kill(victim, signal.SIGKILL)
    seen_down = False
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        view = {w["url"]: w["healthy"] for w in httpx.get(url + "/workers", timeout=5).json()}
        seen_down |= not view.get(f"http://127.0.0.1:{base}", False)
        if seen_down and view.get(f"http://127.0.0.1:{base}"):
            break
        time.sleep(1)
    assert seen_down and view[f"http://127.0.0.1:{base}"], "worker did not come back"


def test_a_worker_that_cannot_start_fails_serve_fast_with_its_log(tmp_path):
    """Bad engine settings (here: a model folder with no model) must not leave `beluga serve` waiting for
    ten minutes: after two failed starts it exits with the engine's own error."""
    empty = tmp_path / "no-model"
    empty.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "beluga", "serve", "--workers", "1", "--no-pool", "--model", str(empty),
           "--port", str(port), "--worker-base-port", str(free_port()), "--log-dir", str(tmp_path / "logs")]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "failed to start 2 times" in out and "no-model" in out, out[-3000:]
    assert time.monotonic() - t0 < 240
