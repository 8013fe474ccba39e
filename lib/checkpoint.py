"""Checkpoint I/O for local Hugging Face directories: safetensors only, never unpickled."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import torch
from torch import nn

from lib.errors import FishmergeError

HEAD_SUFFIXES = ("ForSequenceClassification", "ForCausalLM", "LMHeadModel", "ForTokenClassification")
_READ_BLOCK = 16 * 2**20


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's .safetensors files, or a clear error naming what is there instead."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FishmergeError(f"model directory '{d}' does not exist: pass a local Hugging Face model directory")
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FishmergeError(f"'{index}' names missing shard(s) {missing}: copy the whole checkpoint")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        other = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf")]
        hint = (
            f" It holds {other}: fishmerge never unpickles weights; re-save the model with "
            "save_pretrained(..., safe_serialization=True)."
            if other
            else ""
        )
        raise FishmergeError(f"no .safetensors weights in '{d}'.{hint}")
    return files


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def checkpoint_keys(model_dir: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor key -> (safetensors dtype, shape) over all shards."""
    out = {}
    for f in safetensors_files(model_dir):
        for k, v in read_header(f).items():
            out[k] = (v["dtype"], v["shape"])
    return out


def model_fingerprint(model_dir: str | Path) -> str:
    """Content hash of the tensors (name, dtype, shape, bytes), independent of file layout and metadata."""
    h = hashlib.sha256()
    entries = []
    for f in safetensors_files(model_dir):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
        for k, v in read_header(f).items():
            entries.append((k, v, f, 8 + size))
    for k, v, f, base in sorted(entries, key=lambda e: e[0]):
        h.update(json.dumps([k, v["dtype"], v["shape"]]).encode())
        start, end = v["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(base + start)
            left = end - start
            while left:
                block = fh.read(min(left, _READ_BLOCK))
                h.update(block)
                left -= len(block)
    return "sha256:" + h.hexdigest()


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FishmergeError("--device cuda was asked for but no CUDA device is visible: use --device auto or cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise FishmergeError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> tuple[nn.Module, object]:
    """Load a local HF model with a task head and its tokenizer, refusing freshly initialised weights."""
    import transformers

    global LOAD_COUNT
    d = Path(model_dir)
    arch = model_architecture(d)
    with _LOAD_LOCK:
        cls = getattr(transformers, arch, None)
    if cls is None:
        raise FishmergeError(f"this transformers version has no class {arch} (from '{d}/config.json')")
    if dtype != "auto" and dtype not in _DTYPES:
        raise FishmergeError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    kwargs = {"dtype": _DTYPES[dtype]} if dtype != "auto" else {"dtype": "auto"}
    LOAD_COUNT += 1
    transformers.utils.logging.disable_progress_bar()  # one bar per shard is noise; fishmerge shows its own
    with _LOAD_LOCK:  # transformers' lazy imports are not thread-safe: shards loading at once broke them
        model, info = cls.from_pretrained(d, use_safetensors=True, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        raise FishmergeError(
            f"parameters {sorted(info['missing_keys'])[:5]} are not in the checkpoint in '{d}' and were freshly "
            "initialised: a Fisher of random weights is meaningless. Save the fine-tuned model with its head."
        )
    try:
        with _LOAD_LOCK:
            tokenizer = transformers.AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as exc:
        raise FishmergeError(f"no usable tokenizer in '{d}': save the tokenizer next to the model ({exc})") from exc
    return model.to(resolve_device(device)), tokenizer


def checkpoint_names(model: nn.Module, keys: set[str] | dict) -> dict[str, str]:
    """Map each trainable parameter name to its key in the checkpoint (tied aliases and base prefixes)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out, missing = {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        found = None
        for alias in aliases[id(p)]:
            candidates = [alias]
            if prefix and alias.startswith(prefix + "."):
                candidates.append(alias[len(prefix) + 1 :])
            elif prefix:
                candidates.append(f"{prefix}.{alias}")
            found = next((c for c in candidates if c in keys), None)
            if found:
                break
        if found is None:
            missing.append(name)
        out[name] = found
    if missing:
        raise FishmergeError(
            f"parameters {missing[:5]} have no tensor in the checkpoint: the Fisher store keys must be checkpoint "
            "keys. Re-save the model with save_pretrained."
        )
    return out


_LOAD_LOCK = threading.RLock()
LOAD_COUNT = 0  # model weight loads in this process (tests check that reuse loads nothing)


def model_architecture(model_dir: str | Path) -> str:
    """The head class name from config.json, without loading weights."""
    safetensors_files(model_dir)
    cfg = Path(model_dir) / "config.json"
    try:
        arch = (json.loads(cfg.read_text()).get("architectures") or [None])[0]
    except (OSError, json.JSONDecodeError) as exc:
        raise FishmergeError(f"cannot read the model config '{cfg}': {exc}") from exc
    if not arch or not arch.endswith(HEAD_SUFFIXES):
        raise FishmergeError(
            f"'{model_dir}' holds a {arch or 'model of unknown architecture'}; fishmerge needs a model with a task "
            f"head (*{', *'.join(HEAD_SUFFIXES)}). Fine-tune and save the model with its head first."
        )
    return arch


FINGERPRINT_CACHE = ".fishmerge-fingerprint.json"


def cached_model_fingerprint(model_dir: str | Path) -> str:
    """model_fingerprint, cached beside the model keyed by each file's size and mtime (hash once)."""
    d = Path(model_dir)
    files = safetensors_files(d)
    key = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_paths = [
        d / FINGERPRINT_CACHE,
        _user_cache_dir() / (hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:16] + ".json"),
    ]
    for p in cache_paths:
        try:
            cached = json.loads(p.read_text())
            if cached.get("files") == key:
                return cached["fingerprint"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    fp = model_fingerprint(d)
    for p in cache_paths:  # beside the model if writable, else in the user cache
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(json.dumps({"files": key, "fingerprint": fp}))
            tmp.replace(p)
            break
        except OSError:
            continue
    return fp


def _user_cache_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fishmerge" / "fingerprints"
