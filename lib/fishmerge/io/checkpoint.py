"""Checkpoint I/O for local Hugging Face directories: safetensors only, never unpickled."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from fishmerge.errors import FishmergeError
from fishmerge.io.model_ref import hub_cache_dir

HEAD_SUFFIXES = ("ForSequenceClassification", "ForCausalLM", "LMHeadModel", "ForTokenClassification")
_READ_BLOCK = 16 * 2**20
MAX_HEADER = 100 * 2**20  # the safetensors library's own bound on the JSON header
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "spm.model", "bpe.codes",
)  # fmt: skip


TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Content hash of a model folder's tokenizer files (vocabulary, special tokens, chat template): what
    decides a causal LM's token ids and which of them are the response. The weights' fingerprint does not
    cover them."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in sorted(TOKENIZER_FILES + TOKENIZER_SETTINGS):
        f = d / name
        if f.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's .safetensors files, or a clear error naming what is there instead."""
    d = Path(model_dir)
    if d.exists() and not d.is_dir():
        raise FishmergeError(f"model path '{d}' is a file: pass a local Hugging Face model directory")
    if not d.is_dir():
        raise FishmergeError(f"model directory '{d}' does not exist: pass a local Hugging Face model directory")
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = (read_json_file(index, "checkpoint index") or {}).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise FishmergeError(f"'{index}' has no valid weight_map: re-save the checkpoint with save_pretrained")
        # shard names as written must be plain file names (links into a cache's blobs are fine)
        outside = sorted({f for f in weight_map.values() if not f or "/" in f or "\\" in f or f in (".", "..")})
        if outside:
            raise FishmergeError(f"'{index}' names shard(s) outside the model folder: {outside[:3]}")
        files = sorted({d / f for f in weight_map.values()})
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


def read_json_file(path: Path, what: str, limit: int = 64 * 2**20) -> dict:
    """A JSON object from a small file, or one readable error naming the file."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise FishmergeError(f"the {what} '{path}' is {size} bytes: too large to be one")
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FishmergeError(f"cannot read the {what} '{path}' as JSON ({exc}): fix or re-save it") from exc
    if not isinstance(value, dict):
        raise FishmergeError(f"the {what} '{path}' is a JSON {type(value).__name__}, not an object: fix or re-save it")
    return value


def read_header_and_size(path: Path) -> tuple[dict, int]:
    """The validated header of a safetensors file and the header's byte length.

    Every read is bounded by the file's size; every tensor's byte range must lie inside the file
    and match its dtype × shape, so a truncated or corrupt checkpoint is one clear error here, not
    a hang or a traceback later.
    """
    bad = f"'{path}' is not a valid safetensors file"
    fix = "re-save or re-copy this checkpoint"
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FishmergeError(f"{bad} (only {file_size} bytes): {fix}")
            (size,) = struct.unpack("<Q", head)
            if size > min(MAX_HEADER, file_size - 8):
                what = "is truncated" if size <= MAX_HEADER else "is corrupt"
                raise FishmergeError(f"'{path}' {what} (header of {size} bytes in a {file_size}-byte file): {fix}")
            raw = f.read(size)
    except OSError as exc:
        raise FishmergeError(f"cannot read '{path}': {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FishmergeError(f"{bad} (its header is not JSON): {fix}") from exc
    if not isinstance(header, dict):
        raise FishmergeError(f"{bad} (its header is a JSON {type(header).__name__}): {fix}")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    for key, v in header.items():
        ok = (
            isinstance(v, dict)
            and isinstance(v.get("dtype"), str)
            and isinstance(v.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in v["shape"])
            and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2
            and all(isinstance(n, int) for n in v["data_offsets"])
        )
        if not ok:
            raise FishmergeError(f"{bad} (entry '{key}' lacks a dtype, shape or data_offsets): {fix}")
        start, end = v["data_offsets"]
        if not 0 <= start <= end:
            raise FishmergeError(f"{bad} (tensor '{key}' has byte range [{start}, {end})): {fix}")
        if end > data_size:
            raise FishmergeError(
                f"'{path}' is truncated: tensor '{key}' ends at byte {end} of {data_size} data bytes: {fix}"
            )
        itemsize = ITEMSIZE.get(v["dtype"])
        if itemsize is not None and (end - start) != math.prod(v["shape"]) * itemsize:
            raise FishmergeError(
                f"'{path}' is truncated or corrupt: tensor '{key}' ({v['dtype']} {v['shape']}) needs "
                f"{math.prod(v['shape']) * itemsize} bytes but its header gives {end - start}: {fix}"
            )
    return header, size


def read_header(path: Path) -> dict:
    """The validated JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    return read_header_and_size(path)[0]


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
        header, size = read_header_and_size(f)
        for k, v in header.items():
            entries.append((k, v, f, 8 + size))
    for k, v, f, base in sorted(entries, key=lambda e: e[0]):
        h.update(json.dumps([k, v["dtype"], v["shape"]]).encode())
        start, end = v["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(base + start)
            left = end - start
            while left:
                block = fh.read(min(left, _READ_BLOCK))
                if not block:  # the file shrank after its header was checked
                    raise FishmergeError(f"'{f}' is truncated: re-save or re-copy this checkpoint")
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

    d = Path(model_dir)
    arch = model_architecture(d)
    with _LOAD_LOCK:
        cls = getattr(transformers, arch, None)
    if cls is None:
        raise FishmergeError(f"this transformers version has no class {arch} (from '{d}/config.json')")
    if dtype != "auto" and dtype not in _DTYPES:
        raise FishmergeError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    kwargs = {"dtype": _DTYPES[dtype]} if dtype != "auto" else {"dtype": "auto"}
    transformers.utils.logging.disable_progress_bar()  # one bar per shard is noise; fishmerge shows its own
    with _LOAD_LOCK:  # transformers' lazy imports are not thread-safe: shards loading at once broke them
        model, info = cls.from_pretrained(d, use_safetensors=True, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        raise FishmergeError(
            f"parameters {sorted(info['missing_keys'])[:5]} are not in the checkpoint in '{d}' and were freshly "
            "initialised: a Fisher of random weights is meaningless. Save the fine-tuned model with its head."
        )
    return model.to(resolve_device(device)), load_tokenizer(d)


def load_tokenizer(model_dir: str | Path):
    """The model folder's own tokenizer; a folder without tokenizer files is refused (transformers
    would build an empty tokenizer that maps every word to [UNK])."""
    import transformers

    d = Path(model_dir)
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise FishmergeError(
            f"no tokenizer files in '{d}' (none of {', '.join(TOKENIZER_FILES[:4])}, …): save the tokenizer "
            "next to the model (tokenizer.save_pretrained(folder))"
        )
    try:
        with _LOAD_LOCK:
            tokenizer = transformers.AutoTokenizer.from_pretrained(d)
    except Exception as exc:  # OSError, ValueError, tokenizers' own exceptions on a corrupt file
        raise FishmergeError(f"no usable tokenizer in '{d}': save the tokenizer next to the model ({exc})") from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)) + 1:
        raise FishmergeError(
            f"the tokenizer in '{d}' has no vocabulary ({len(tokenizer)} tokens, all special): save the model's "
            "real tokenizer next to it"
        )
    return tokenizer


_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer", "xlm-roberta-xl"}


def position_limit(config) -> int | None:
    """The longest token sequence the model's position embeddings allow (None: no fixed limit).

    RoBERTa-style models count positions from padding_idx + 1, so two fewer than the table holds.
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    limit = get("max_position_embeddings") or get("n_positions") or get("n_ctx")
    if not isinstance(limit, int) or limit <= 0:
        return None
    if get("model_type") in _ROBERTA_LIKE:
        limit -= int(get("pad_token_id") or 0) + 1
    return limit


_noticed: set[tuple] = set()


def clamp_length(max_length: int, config, where: str, model: str | Path = "") -> int:
    """max_length, clamped to the model's position limit with a one-line notice (once per model and
    step in a process: the Fisher's steps resolve the spec more than once)."""
    limit = position_limit(config)
    if limit is None or max_length <= limit:
        return max_length
    key = (max_length, limit, where, str(model))
    if key not in _noticed:
        _noticed.add(key)
        print(
            f"fishmerge: note: max_length {max_length} exceeds the model's {limit} positions: using {limit} "
            f"for the {where}",
            file=sys.stderr,
        )
    return limit


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a model folder as a dict, or one readable error."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FishmergeError(f"'{model_dir}' has no config.json: pass a Hugging Face model folder (save_pretrained)")
    return read_json_file(cfg, "model config")


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


def model_architecture(model_dir: str | Path) -> str:
    """The head class name from config.json, without loading weights."""
    safetensors_files(model_dir)
    archs = read_model_config(model_dir).get("architectures") or [None]
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
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
    # Beside the model, unless the folder is a snapshot of the Hugging Face cache (not ours to write in).
    beside = [] if d.resolve().is_relative_to(hub_cache_dir().resolve()) else [d / FINGERPRINT_CACHE]
    cache_paths = [
        *beside,
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
            for stale in p.parent.glob(p.name + ".tmp-*"):  # left by a process killed while writing
                if time.time() - stale.stat().st_mtime > 600:
                    stale.unlink(missing_ok=True)
            tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps({"files": key, "fingerprint": fp}))
            tmp.replace(p)
            break
        except OSError:
            continue
    return fp


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fishmerge" / "fingerprints"
