"""GGUF to a Hugging Face model folder: dequantise once, then load it like any fine-tuned checkpoint.

`gguf_to_hf_folder` reads a GGUF file with transformers (`from_pretrained(dir, gguf_file=...)`, which
needs the `gguf` package), copies the dequantised weights into a plain model built from its config
(the GGUF-loaded model refuses `save_pretrained`), and writes `model.safetensors`, the config and
the tokenizer (from the same GGUF). The folder is built in a temporary sibling and renamed into
place, so an interrupted run never leaves a half-written folder. A folder already at `out_dir` is
replaced only when this function wrote it (its `SOURCE_FILE` marker); anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from fishmerge.errors import FishmergeError

SOURCE_FILE = "fishmerge-gguf.json"  # what the folder was made from: {"gguf", "bytes", "dtype"}


def gguf_source(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> dict:
    """The marker a folder made from this GGUF file and dtype carries (compare it to skip the work)."""
    p = Path(gguf_path)
    return {"gguf": p.name, "bytes": p.stat().st_size, "dtype": str(dtype).removeprefix("torch.")}


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise `gguf_path` into a safetensors HF folder (weights in `dtype`, config, tokenizer) at
    `out_dir`, atomically; returns `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf, out = Path(gguf_path), Path(out_dir)
    if not gguf.is_file():
        raise FishmergeError(f"GGUF file '{gguf}' does not exist")
    if out.exists() and not (out / SOURCE_FILE).is_file():
        raise FishmergeError(f"'{out}' exists and was not written by gguf_to_hf_folder: remove it or pick another")
    source = gguf_source(gguf, dtype)
    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF note: a model carrying it refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded

    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        stray = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if stray:
            raise FishmergeError(f"transformers wrote pickled files {stray}: only safetensors are accepted")
        (tmp / SOURCE_FILE).write_text(json.dumps(source))
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)  # put the earlier folder back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
