"""Out-of-core merge throughput and memory: fishmerge against a streaming floor and mergekit.

Inputs are synthetic Llama-shaped checkpoints built locally from a `LlamaConfig` (tensor names
and shapes from a model on the `meta` device, random bf16 values generated tensor by tensor,
2 GB safetensors shards), each with a synthetic Fisher store v1 (fp32, exponential values,
`model_fingerprint` of its model). They are cached under `.fishmerge/bench/merge/` (never
committed) and reused by later runs. Every timed step runs as a subprocess, measured the same
way: wall time, and peak anonymous memory (RssAnon of the process and all its children, summed
per sample, every 50 ms; page-cache-backed file mappings are not counted). By default the
inputs are evicted from the page cache before each step (`--warm-cache` keeps them).

  floor (models)   plain numpy: read every model byte once (pread, row slabs), λ-weighted sum
                   in fp32, round to bf16 with bit ops, write one output of the output's size
  floor (fisher)   the same plus every Fisher byte (raw Zarr chunk files), Σ λF θ / Σ λF
  mergekit linear  `mergekit-yaml` 0.1.5 (its own venv), equal weights, bfloat16, 2 GB shards
  fishmerge        `fishmerge merge CFG --overwrite`, method isotropic, then fisher,
                   memory_limit 2GB, one target (m0); Prefect server started once here
  --big            the larger-than-RAM run: 2 models of ~6 GB bf16 + fp32 Fishers (~12 GB
                   each), fishmerge fisher only, memory_limit 2GB; inputs deleted afterwards

  python benchmarks/merge_throughput.py [--size-gb 1.1] [--models 3] [--skip-mergekit] [--big]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

BENCH_DIR = ROOT / ".fishmerge" / "bench" / "merge"
FISHMERGE = ROOT / ".venv" / "bin" / "fishmerge"
PYTHON = ROOT / ".venv" / "bin" / "python"
MERGEKIT = Path("/work/.mergekit-venv/bin/mergekit-yaml")
DOC = ROOT / "docs" / "benchmarks.md"
JSON_OUT = ROOT / "docs" / "benchmarks_merge_cpu.json"
SHARD_BYTES = 2 * 10**9  # fishmerge "2GB" (10⁹) = mergekit --out-shard-size 2B (bytes)
VOCAB = 32000
GEN_SLAB_ELEMS = 8 * 2**20  # input generation: ≈ 32 MiB of fp32 per write
FLOOR_SLAB_ELEMS = 2**18  # floor: 1 MiB of fp32 per slab and stream (cache-resident; measured fastest)
DOC_BEGIN, DOC_END = "<!-- merge_throughput:begin -->", "<!-- merge_throughput:end -->"
GB = 1e9


# --------------------------------------------------------------------------- measurement


def rss_anon(pid: int) -> int:
    """RssAnon of one process in bytes (0 if it is gone): what a memory limit is really about."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


@dataclass
class Measured:
    """One subprocess run: wall seconds, CPU seconds (user + sys, with its reaped children), peak
    summed RssAnon (process + children), exit status. CPU time is the steadier number on a shared
    machine: wall time there includes waiting for other jobs' processes."""

    cmd: list[str]
    wall_s: float
    cpu_s: float
    peak_rss_anon: int
    rc: int
    log: str
    samples: int = 0


def run_measured(
    cmd: list[str], *, env: dict | None = None, cwd: str | Path | None = None, log: Path, poll_s: float = 0.05
) -> Measured:
    """Run `cmd`, polling RssAnon of it and its children every `poll_s` (summed per sample)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak, samples = 0, 0
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            total = rss_anon(p.pid)
            try:
                total += sum(rss_anon(c.pid) for c in proc.children(recursive=True))
            except psutil.Error:
                pass
            peak, samples = max(peak, total), samples + 1
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Measured([str(c) for c in cmd], wall, cpu, peak, p.returncode, str(log), samples)


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (after writing back dirty pages), so reads hit disk."""
    os.sync()
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def input_bytes(path: Path) -> int:
    """Bytes a merge must read: a model folder's safetensors files, or a whole Fisher store."""
    shards = list(path.glob("*.safetensors")) if path.is_dir() else []
    return sum(f.stat().st_size for f in shards) if shards else tree_bytes(path)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- inputs


def llama_config(size_gb: float):
    """A LlamaConfig whose bf16 checkpoint is about `size_gb` GB (GQA, untied lm_head)."""
    from transformers import LlamaConfig

    if size_gb < 3:
        hidden, inter, heads, kv = 1536, 4096, 12, 4
    else:
        hidden, inter, heads, kv = 3072, 8192, 24, 8
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    embed = 2 * VOCAB * hidden + hidden
    layers = max(1, round((size_gb * GB / 2 - embed) / per_layer))
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def checkpoint_layout(config) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor `LlamaForCausalLM(config)` saves, from a meta-device model."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = x.view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32, into `out` (a uint32 buffer of the same size) if given."""
    u = np.empty(bits.shape, dtype=np.uint32) if out is None else out
    u[...] = bits
    u <<= 16
    return u.view(np.float32)


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row): a 1-D tensor is rows of one element."""
    if len(shape) <= 1:
        return (shape[0] if shape else 1), 1
    return shape[0], math.prod(shape[1:])


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary, built offline (the merge copies it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        out
    )


def write_model(out: Path, config, seed: int) -> None:
    """A checkpoint folder: config, generation config, tokenizer, random bf16 safetensors shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    write_tokenizer(tmp, config.vocab_size)
    layout = checkpoint_layout(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in layout:  # greedy shards of ≤ SHARD_BYTES, in checkpoint order (as HF does)
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        tensors = {}
        for key, shape in shard:  # one tensor at a time, in fp32 slabs: bounded memory
            rows, row = _rows(shape)
            bits = np.empty(rows * row, dtype=np.uint16)
            step = max(1, GEN_SLAB_ELEMS // row) * row
            for s in range(0, bits.size, step):
                x = rng.standard_normal(min(step, bits.size - s), dtype=np.float32)
                x *= 0.02
                if len(shape) == 1:
                    x += 1.0  # norm weights near 1, as trained models have
                bits[s : s + x.size] = to_bf16_bits(x)
            tensors[key] = torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
            weight_map[key] = name
            total += bits.nbytes
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def write_fisher(uri: Path, model_dir: Path, seed: int) -> None:
    """A synthetic Fisher store v1 for `model_dir`: positive fp32 values, written in chunk-aligned slabs."""
    from fishmerge.fisher.store import abort_store, begin_store, chunk_shape, commit_store, create_fisher_array
    from fishmerge.io.checkpoint import cached_model_fingerprint, checkpoint_keys

    rng = np.random.default_rng(seed)
    fingerprint = cached_model_fingerprint(model_dir)  # = model_fingerprint; cached so the merge's check is cheap
    staging, group = begin_store(str(uri))
    try:
        for key, (_, shape) in checkpoint_keys(model_dir).items():
            shape = tuple(shape)
            arr = create_fisher_array(group, key, shape)
            rows, row = _rows(shape)
            crow = chunk_shape(shape)[0] if shape else 1
            step = max(1, GEN_SLAB_ELEMS // (crow * row)) * crow  # whole chunks per write: no read-modify-write
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                x = rng.standard_exponential((r1 - r0) * row, dtype=np.float32)
                x *= 1e-4
                arr[r0:r1] = x.reshape((r1 - r0, *shape[1:]))
        commit_store(
            staging,
            str(uri),
            group,
            {
                "estimator": "synthetic",
                "n_examples": 1,
                "model_fingerprint": fingerprint,
                "data_fingerprint": "synthetic",
            },
        )
    except BaseException:
        abort_store(staging)
        raise


@dataclass
class Inputs:
    root: Path
    models: list[Path]
    fishers: list[Path]
    params: int
    config: dict = field(default_factory=dict)

    @property
    def model_bytes(self) -> int:
        """Tensor files only (config and tokenizer files are ≈ 1 MB and not merge input)."""
        return sum(f.stat().st_size for m in self.models for f in m.glob("*.safetensors"))

    @property
    def fisher_bytes(self) -> int:
        return sum(tree_bytes(f) for f in self.fishers)


def make_inputs(size_gb: float, k: int, root: Path) -> Inputs:
    """Build (or reuse) K models and their Fishers under `root`; each finished item is marked."""
    config = llama_config(size_gb)
    layout = checkpoint_layout(config)
    params = sum(math.prod(s) for _, s in layout)
    tag = f"llama-h{config.hidden_size}-l{config.num_hidden_layers}-v{VOCAB}"
    base = root / tag
    base.mkdir(parents=True, exist_ok=True)
    # models + Fishers (Zarr pads each array's last row chunk: up to ~25 % more) + one output model
    need = k * params * (2 + 5) + params * 2 - sum(tree_bytes(p) for p in base.iterdir())
    free = shutil.disk_usage(base).free
    if need > free - 5 * GB:
        sys.exit(f"not enough disk under {base}: need ≈{need / GB:.1f} GB more, {free / GB:.1f} GB free")
    models, fishers = [], []
    for i in range(k):
        m, f = base / f"m{i}", base / f"m{i}.fisher.zarr"
        marker = base / f"m{i}.done.json"
        if not (marker.exists() and m.is_dir() and f.is_dir()):
            t0 = time.perf_counter()
            print(f"[inputs] writing {m} ({params / 1e6:.0f} M params, seed {i}) …", file=sys.stderr, flush=True)
            write_model(m, config, seed=i)
            t1 = time.perf_counter()
            print(f"[inputs] writing {f} …", file=sys.stderr, flush=True)
            write_fisher(f, m, seed=1000 + i)
            marker.write_text(json.dumps({"model_s": t1 - t0, "fisher_s": time.perf_counter() - t1}))
        models.append(m)
        fishers.append(f)
    cfg = {
        k: getattr(config, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    return Inputs(base, models, fishers, params, cfg)


# --------------------------------------------------------------------------- the floor


def _tensor_refs(model_dir: Path) -> dict[str, tuple[str, int, str, tuple[int, ...]]]:
    """key -> (file, absolute byte offset, dtype, shape) over the checkpoint's shards."""
    import struct

    from fishmerge.io.checkpoint import read_header, safetensors_files

    refs = {}
    for f in safetensors_files(model_dir):
        with open(f, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
        for key, v in read_header(f).items():
            refs[key] = (str(f), 8 + hlen + v["data_offsets"][0], v["dtype"], tuple(v["shape"]))
    return refs


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at {offset + done}")
        done += n


class _FisherChunks:
    """Raw reads of a v1 store's chunk files (uncompressed, little-endian, chunks of whole rows)."""

    def __init__(self, store: Path):
        self.store = store
        self.meta: dict[str, tuple[int, int]] = {}

    def _chunk_rows(self, key: str) -> tuple[int, int]:
        if key not in self.meta:
            meta = json.loads((self.store / key / "zarr.json").read_text())
            codecs = [c["name"] for c in meta["codecs"]]
            shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            if codecs != ["bytes"] or meta["data_type"] != "float32" or list(chunks[1:]) != list(shape[1:]):
                raise SystemExit(f"floor: {self.store}/{key} is not an uncompressed row-chunked v1 array")
            if meta["chunk_key_encoding"]["configuration"].get("separator", "/") != "/":
                raise SystemExit(f"floor: {self.store}/{key}: unexpected chunk key encoding")
            self.meta[key] = (chunks[0], len(shape))
        return self.meta[key]

    def read(self, key: str, r0: int, r1: int, row: int, out: np.ndarray) -> None:
        """Rows [r0, r1) into out (flat fp32), from as many chunk files as they span; a missing chunk is zeros."""
        crow, ndim = self._chunk_rows(key)
        pos = 0
        for c in range(r0 // crow, (r1 - 1) // crow + 1):
            lo, hi = max(r0, c * crow), min(r1, (c + 1) * crow)
            n = (hi - lo) * row
            path = self.store / key / "c" / "/".join([str(c)] + ["0"] * (ndim - 1))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                out[pos : pos + n] = 0.0
            else:
                try:
                    _pread_into(fd, out[pos : pos + n], (lo - c * crow) * row * 4)
                finally:
                    os.close(fd)
            pos += n


def floor_merge(models: list[str], fishers: list[str] | None, weights: list[float], out_path: str) -> int:
    """The streaming floor: every input byte read once, the bf16 output written once, plain numpy.

    Without Fishers: Σ λ_i θ_i (λ normalised). With Fishers: Σ λ_i F_i θ_i / Σ λ_i F_i. Returns
    the bytes read. Bounded memory: a few FLOOR_SLAB_ELEMS-sized buffers.
    """
    refs = [_tensor_refs(Path(m)) for m in models]
    chunks = [_FisherChunks(Path(f)) for f in fishers] if fishers else None
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).astype(np.float32)
    fds = {f: os.open(f, os.O_RDONLY) for r in refs for f, *_ in r.values()}
    keys = list(refs[0])
    header, off = {}, 0
    for key in keys:
        _, _, dtype, shape = refs[0][key]
        if dtype != "BF16" or any(r[key][2:] != (dtype, shape) for r in refs):
            raise SystemExit(f"floor: '{key}' must be BF16 with equal shapes in every model")
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    plan = []  # (key, rows, row elements, slab rows)
    for key in keys:
        rows, row = _rows(refs[0][key][3])
        plan.append((key, rows, row, max(1, FLOOR_SLAB_ELEMS // row)))
    cap = max(min(rows, step) * row for _, rows, row, step in plan)
    bits, u32 = np.empty(cap, dtype=np.uint16), np.empty(cap, dtype=np.uint32)
    num_buf = np.empty(cap, dtype=np.float32)
    den_buf = np.empty(cap, dtype=np.float32) if chunks else None
    fis_buf = np.empty(cap, dtype=np.float32) if chunks else None
    read = 0
    try:
        with open(out_path, "wb") as out:
            out.write(len(hbytes).to_bytes(8, "little") + hbytes)
            for key, rows, row, step in plan:
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    n = (r1 - r0) * row
                    num = num_buf[:n]
                    num[...] = 0.0
                    if chunks:
                        den, fis = den_buf[:n], fis_buf[:n]
                        den[...] = 0.0
                    for i, r in enumerate(refs):
                        f, base, _, _ = r[key]
                        _pread_into(fds[f], bits[:n], base + r0 * row * 2)
                        theta = bf16_to_f32(bits[:n], u32[:n])
                        read += 2 * n
                        if chunks is None:
                            theta *= w[i]
                            num += theta
                        else:
                            chunks[i].read(key, r0, r1, row, fis)
                            read += 4 * n
                            fis *= w[i]
                            den += fis
                            fis *= theta
                            num += fis
                    if chunks:
                        num /= den
                    out.write(to_bf16_bits(num).tobytes())
    finally:
        for fd in fds.values():
            os.close(fd)
    return read


# --------------------------------------------------------------------------- the runs


def machine() -> dict:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / GB, 1),
        "disk_free_gb": round(shutil.disk_usage(BENCH_DIR).free / GB, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def mergekit_version() -> str | None:
    pip = MERGEKIT.parent / "pip"
    try:
        out = subprocess.run([str(pip), "show", "mergekit", "torch", "transformers"], capture_output=True, text=True)
    except OSError:
        return None
    pairs = [ln.split(": ", 1)[1] for ln in out.stdout.splitlines() if ln.startswith(("Name:", "Version:"))]
    return ", ".join(f"{a} {b}" for a, b in zip(pairs[::2], pairs[1::2], strict=False)) or None


def fishmerge_merge_available() -> tuple[bool, str]:
    """Whether `fishmerge merge --help` works (the merge command is built), and its last message line."""
    try:
        r = subprocess.run([str(FISHMERGE), "merge", "--help"], capture_output=True, text=True)
    except OSError as exc:
        return False, str(exc)
    lines = (r.stderr or r.stdout).strip().splitlines()
    return r.returncode == 0, lines[-1] if lines else ""


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def result_of(m: Measured, *, input_bytes: int, output_bytes: int, memory_limit: int) -> dict:
    d = asdict(m)
    d["peak_rss_anon_gb"] = m.peak_rss_anon / GB
    d["input_gb"] = input_bytes / GB
    d["output_gb"] = output_bytes / GB
    d["read_gb_per_s"] = input_bytes / GB / m.wall_s
    d["peak_rss_anon_over_limit"] = m.peak_rss_anon / memory_limit
    return d


def fishmerge_config(inp: Inputs, method: str, output: Path, memory_limit: str, path: Path) -> Path:
    import yaml

    cfg = {
        "name": "bench",
        "method": method,
        "models": [
            {"name": m.name, "path": str(m.resolve()), "weight": 1.0, "fisher": str(f.resolve())}
            for m, f in zip(inp.models, inp.fishers, strict=True)
        ],
        "fisher": {"floor": 1.0e-6, "favor_target": True, "normalize": False},
        "targets": [inp.models[0].name],
        "output": str(output.resolve()),
        "dtype": "auto",
        "memory_limit": memory_limit,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mergekit_config(inp: Inputs, path: Path) -> Path:
    import yaml

    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(m.resolve()), "parameters": {"weight": 1.0}} for m in inp.models],
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def one_step(name: str, cmd: list[str], *, inputs: list[Path], output: Path, work: Path, args, env=None) -> dict:
    """Evict inputs (unless warm), run and measure `cmd`, size and remove its output."""
    remove(output)
    if not args.warm_cache:
        evict(inputs)
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    m = run_measured(cmd, env=env, log=work / f"{name}.log")
    out_bytes = tree_bytes(output) if output.exists() else 0
    res = result_of(
        m,
        input_bytes=sum(input_bytes(p) for p in inputs),
        output_bytes=out_bytes,
        memory_limit=args.memory_limit_bytes,
    )
    status = "ok" if m.rc == 0 else f"FAILED rc={m.rc} (log {m.log})"
    print(
        f"[{name}] {status}: {m.wall_s:.1f} s, peak RssAnon {m.peak_rss_anon / GB:.2f} GB, output {out_bytes / GB:.2f} GB",
        file=sys.stderr,
        flush=True,
    )
    if m.rc != 0:
        tail = Path(m.log).read_text()[-3000:]
        print(tail, file=sys.stderr)
        res["log_tail"] = tail
    if not args.keep:
        remove(output)
    return res


def floor_cmd(inp: Inputs, fisher: bool, out: Path, work: Path) -> list[str]:
    spec = {
        "models": [str(m) for m in inp.models],
        "fishers": [str(f) for f in inp.fishers] if fisher else None,
        "weights": [1.0] * len(inp.models),
        "out": str(out),
    }
    p = work / f"floor-{'fisher' if fisher else 'models'}.json"
    p.write_text(json.dumps(spec))
    return [str(PYTHON), str(Path(__file__).resolve()), "--floor-worker", str(p)]


def best(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {**runs[-1], "all_wall_s": [r["wall_s"] for r in runs]}
    b = min(ok, key=lambda r: r["wall_s"])
    return {
        **b,
        "all_wall_s": [r["wall_s"] for r in runs],
        "max_peak_rss_anon_gb": max(r["peak_rss_anon_gb"] for r in ok),
    }


def prefect_env(stack):
    """One Prefect server for every fishmerge subprocess (a production merge talks to a running server)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    stack.enter_context(prefect_test_harness(server_startup_timeout=120))
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def standard_run(args) -> dict:
    import contextlib

    inp = make_inputs(args.size_gb, args.models, BENCH_DIR)
    work = BENCH_DIR / "work"
    outdir = BENCH_DIR / "out"
    work.mkdir(parents=True, exist_ok=True)
    outdir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "kind": "standard",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/merge_throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_avg_start": os.getloadavg(),
        "cache": "warm" if args.warm_cache else "cold (inputs evicted before each step)",
        "memory_limit": args.memory_limit,
        "memory_limit_bytes": args.memory_limit_bytes,
        "inputs": {
            "models": args.models,
            "params": inp.params,
            "llama_config": inp.config,
            "model_gb_each": inp.model_bytes / len(inp.models) / GB,
            "fisher_gb_each": inp.fisher_bytes / len(inp.fishers) / GB,
            "fisher_tensor_gb_each": inp.params * 4 / GB,
            "isotropic_input_gb": inp.model_bytes / GB,
            "fisher_input_gb": (inp.model_bytes + inp.fisher_bytes) / GB,
        },
        "runs": {},
    }
    runs: dict[str, list[dict]] = {}
    have_merge, why = (False, "--skip-fishmerge") if args.skip_fishmerge else fishmerge_merge_available()
    if not have_merge:
        print(f"[fishmerge] SKIPPED: `fishmerge merge --help` failed ({why})", file=sys.stderr)
        reason = why if args.skip_fishmerge else f"`fishmerge merge` not available yet: {why}"
        results["runs"]["fishmerge_isotropic"] = results["runs"]["fishmerge_fisher"] = {"skipped": reason}
    mk_ok = not args.skip_mergekit and MERGEKIT.exists()
    if not args.skip_mergekit and not MERGEKIT.exists():
        results["runs"]["mergekit_linear"] = {"skipped": f"{MERGEKIT} not found (see the script's docstring)"}
    if mk_ok:
        results["mergekit"] = mergekit_version()
    with contextlib.ExitStack() as stack:
        env = prefect_env(stack) if have_merge else None
        steps = [("floor_models", False), ("mergekit_linear", None), ("fishmerge_isotropic", "isotropic")]
        steps += [("floor_fisher", True), ("fishmerge_fisher", "fisher")]
        for _ in range(args.repeats):
            for name, what in steps:
                if name.startswith("floor") and args.skip_floor:
                    continue
                if name == "mergekit_linear" and not mk_ok:
                    continue
                if name.startswith("fishmerge") and not have_merge:
                    continue
                ins = inp.models + (inp.fishers if name.endswith("fisher") else [])
                if name.startswith("floor"):
                    out = outdir / f"{name}.safetensors"
                    cmd = floor_cmd(inp, what, out, work)
                    res = one_step(name, cmd, inputs=ins, output=out, work=work, args=args)
                elif name == "mergekit_linear":
                    out = outdir / "mergekit-linear"
                    cfg = mergekit_config(inp, work / "mergekit.yml")
                    cmd = [str(MERGEKIT), str(cfg), str(out), "--out-shard-size", "2B", "--quiet"]
                    res = one_step(name, cmd, inputs=ins, output=out, work=work, args=args)
                else:
                    out = outdir / f"bench-{what}"
                    cfg = fishmerge_config(inp, what, out, args.memory_limit, work / f"fishmerge-{what}.yml")
                    cmd = [str(FISHMERGE), "merge", str(cfg), "--overwrite"]
                    res = one_step(name, cmd, inputs=ins, output=out, work=work, args=args, env=env)
                runs.setdefault(name, []).append(res)
    for name, rs in runs.items():
        results["runs"][name] = best(rs)
    results["load_avg_end"] = os.getloadavg()
    results["ratios"] = ratios(results["runs"])
    return results


RATIOS = (
    ("fishmerge_isotropic", "mergekit_linear"),
    ("fishmerge_fisher", "floor_fisher"),
    ("fishmerge_isotropic", "floor_models"),
    ("mergekit_linear", "floor_models"),
)


def ratios(r: dict) -> dict:
    """Wall-time ratios (the targets) and the same ratios of CPU time (steadier on a shared machine)."""

    def get(name, what):
        x = r.get(name, {})
        return x.get(what) if x.get("rc") == 0 else None

    out = {}
    for what, suffix in (("wall_s", ""), ("cpu_s", "_cpu")):
        for a, b in RATIOS:
            va, vb = get(a, what), get(b, what)
            out[f"{a}_over_{b}{suffix}"] = va / vb if va and vb else None
    for name, x in r.items():
        if "peak_rss_anon_over_limit" in x:
            out[f"{name}_peak_rss_anon_over_limit"] = x["peak_rss_anon_over_limit"]
    return out


def big_run(args) -> dict:
    have_merge, why = fishmerge_merge_available()
    if not have_merge:
        sys.exit(f"--big needs `fishmerge merge` (`fishmerge merge --help` failed: {why}); nothing generated")
    import contextlib

    root = BENCH_DIR / "big"
    inp = make_inputs(args.size_gb, args.models, root)
    total = inp.model_bytes + inp.fisher_bytes
    ram = psutil.virtual_memory().total
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    out = root / "out" / "bench-fisher"
    results = {
        "kind": "big",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/merge_throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_avg_start": os.getloadavg(),
        "memory_limit": args.memory_limit,
        "memory_limit_bytes": args.memory_limit_bytes,
        "inputs": {
            "models": args.models,
            "params": inp.params,
            "llama_config": inp.config,
            "model_gb_each": inp.model_bytes / len(inp.models) / GB,
            "fisher_gb_each": inp.fisher_bytes / len(inp.fishers) / GB,
            "fisher_input_gb": total / GB,
            "ram_gb": ram / GB,
            "input_exceeds_ram": total > ram,
        },
    }
    try:
        with contextlib.ExitStack() as stack:
            env = prefect_env(stack)
            cfg = fishmerge_config(inp, "fisher", out, args.memory_limit, work / "fishmerge-fisher.yml")
            cmd = [str(FISHMERGE), "merge", str(cfg), "--overwrite"]
            res = one_step(
                "big_fishmerge_fisher",
                cmd,
                inputs=inp.models + inp.fishers,
                output=out,
                work=work,
                args=args,
                env=env,
            )
        res["completed"] = res["rc"] == 0
        results["fishmerge_fisher"] = res
    finally:
        results["load_avg_end"] = os.getloadavg()
        if not args.keep:
            print(f"[big] removing {root}", file=sys.stderr)
            shutil.rmtree(root, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- report


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _spread(runs: dict) -> str:
    """How much one step's wall time varied between rounds (the machine's noise, in words)."""
    spreads = [max(r["all_wall_s"]) / min(r["all_wall_s"]) for r in runs.values() if len(r.get("all_wall_s", [])) > 1]
    return f": wall times of one step varied by up to {max(spreads):.2f}× between rounds" if spreads else ""


def _rounds(runs: dict) -> str:
    n = max((len(r.get("all_wall_s", [])) for r in runs.values()), default=1)
    return f"{n} rounds (steps interleaved)" if n > 1 else "1 round"


def render_doc(data: dict) -> str:
    """The 'Merge throughput' section of docs/benchmarks.md, from the JSON results."""
    lines = [DOC_BEGIN, "## Merge throughput (`benchmarks/merge_throughput.py`)", ""]
    s = data.get("standard")
    if s:
        i, m = s["inputs"], s["machine"]
        lines += [
            "```bash",
            s["command"].replace("python ", ".venv/bin/python ", 1),
            "```",
            "",
            f"Run {s['date']} on {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, no GPU — a **shared** "
            f"machine (other agents' jobs were running: load average {s['load_avg_start'][0]:.1f} at the start, "
            f"{s['load_avg_end'][0]:.1f} at the end){_spread(s['runs'])}. CPU time (user + sys of the step's "
            "processes) is the steadier measure there; wall time includes waiting for other jobs. Best wall time "
            f"of {_rounds(s['runs'])} shown, all rounds in brackets. Page cache: {s['cache']}.",
            "",
            f"Inputs: {i['models']} synthetic `LlamaForCausalLM` checkpoints (hidden {i['llama_config']['hidden_size']}, "
            f"{i['llama_config']['num_hidden_layers']} layers, vocab {i['llama_config']['vocab_size']}, untied; "
            f"{i['params'] / 1e6:.0f} M params, {i['model_gb_each']:.2f} GB bf16 each) with fp32 Fisher stores "
            f"({i['fisher_gb_each']:.2f} GB each on disk, of which {i['fisher_tensor_gb_each']:.2f} GB tensor data; the "
            "rest is Zarr's padding of each array's last row chunk to a full chunk, which the floor skips): "
            f"{i['isotropic_input_gb']:.2f} GB to read for isotropic/linear, "
            f"{i['fisher_input_gb']:.2f} GB for fisher. One output model (target m0). Memory limit "
            f"`{s['memory_limit']}` ({s['memory_limit_bytes'] / GB:.1f} GB). Peak memory = peak RssAnon of the "
            "process and its children, sampled every 50 ms. mergekit: "
            f"{s.get('mergekit') or 'not run'}.",
            "",
            "| step | input GB | wall s | CPU s | read GB/s | peak RssAnon GB | ÷ memory limit |",
            "|---|---|---|---|---|---|---|",
        ]
        labels = {
            "floor_models": "floor, models only (numpy, read once, write once)",
            "mergekit_linear": "mergekit-yaml linear, bfloat16, --out-shard-size 2B",
            "fishmerge_isotropic": "fishmerge merge, isotropic",
            "floor_fisher": "floor, models + Fishers (Σ λFθ / Σ λF)",
            "fishmerge_fisher": "fishmerge merge, fisher",
        }
        for key, label in labels.items():
            r = s["runs"].get(key)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {label} | — | skipped: {r['skipped']} | | | | |")
                continue
            wall = _f(r["wall_s"], "{:.1f}") + ("" if r["rc"] == 0 else f" (FAILED rc={r['rc']})")
            if len(r.get("all_wall_s", [])) > 1:
                wall += " (" + ", ".join(f"{w:.1f}" for w in r["all_wall_s"]) + ")"
            lines.append(
                f"| {label} | {r['input_gb']:.2f} | {wall} | {r['cpu_s']:.1f} | {r['read_gb_per_s']:.2f} | "
                f"{r['peak_rss_anon_gb']:.2f} | {r['peak_rss_anon_over_limit']:.2f} |"
            )
        q = s["ratios"]
        iso_mk = q.get("fishmerge_isotropic_over_mergekit_linear")
        fis_fl = q.get("fishmerge_fisher_over_floor_fisher")
        lines += [
            "",
            "| ratio | wall | CPU time | target (wall) |",
            "|---|---|---|---|",
            f"| fishmerge isotropic ÷ mergekit linear | {_f(iso_mk)} | "
            f"{_f(q.get('fishmerge_isotropic_over_mergekit_linear_cpu'))} | ≤ 1.00 "
            + ("" if iso_mk is None else ("✔" if iso_mk <= 1 else "✘"))
            + " |",
            f"| fishmerge fisher ÷ floor (fisher input) | {_f(fis_fl)} | "
            f"{_f(q.get('fishmerge_fisher_over_floor_fisher_cpu'))} | ≤ 1.50 "
            + ("" if fis_fl is None else ("✔" if fis_fl <= 1.5 else "✘"))
            + " |",
            f"| fishmerge isotropic ÷ floor (models) | {_f(q.get('fishmerge_isotropic_over_floor_models'))} | "
            f"{_f(q.get('fishmerge_isotropic_over_floor_models_cpu'))} | |",
            f"| mergekit linear ÷ floor (models) | {_f(q.get('mergekit_linear_over_floor_models'))} | "
            f"{_f(q.get('mergekit_linear_over_floor_models_cpu'))} | |",
        ]
        for key in ("fishmerge_isotropic", "fishmerge_fisher"):
            v = q.get(f"{key}_peak_rss_anon_over_limit")
            lines.append(
                f"| {key.replace('_', ' ')} peak RssAnon ÷ memory limit | {_f(v)} | | ≤ 1.00 "
                + ("" if v is None else ("✔" if v <= 1 else "✘"))
                + " |"
            )
        lines.append("")
    b = data.get("big")
    lines += ["### Larger than RAM (`--big`)", ""]
    if b:
        i, r = b["inputs"], b["fishmerge_fisher"]
        lines += [
            "```bash",
            b["command"].replace("python ", ".venv/bin/python ", 1),
            "```",
            "",
            f"Run {b['date']}: {i['models']} models of {i['model_gb_each']:.2f} GB bf16 + fp32 Fishers of "
            f"{i['fisher_gb_each']:.2f} GB = {i['fisher_input_gb']:.1f} GB of input on a {i['ram_gb']:.1f} GB machine, "
            f"`fishmerge merge` method fisher, `memory_limit: {b['memory_limit']}`: "
            + ("**completed**" if r["rc"] == 0 else f"**FAILED** (rc {r['rc']})")
            + f" in {r['wall_s']:.0f} s (CPU {r['cpu_s']:.0f} s; {r['read_gb_per_s']:.2f} GB/s read), peak RssAnon "
            f"{r['peak_rss_anon_gb']:.2f} GB ({r['peak_rss_anon_over_limit']:.2f} × the limit), "
            f"output {r['output_gb']:.2f} GB.",
            "",
        ]
    else:
        lines += ["Not run yet (`--big` needs `fishmerge merge`).", ""]
    lines += [
        "Raw numbers: `docs/benchmarks_merge_cpu.json`. Inputs are cached under `.fishmerge/bench/merge/`",
        "(never committed); `--big` deletes its ~36 GB of inputs afterwards unless `--keep`.",
        DOC_END,
    ]
    return "\n".join(lines)


def write_doc(data: dict) -> None:
    text = DOC.read_text()
    section = render_doc(data)
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        text = head + section + rest.split(DOC_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def print_table(res: dict) -> None:
    rows = res.get("runs") or {"big_fishmerge_fisher": res.get("fishmerge_fisher", {})}
    print(f"{'step':<22} {'input GB':>9} {'wall s':>8} {'CPU s':>7} {'GB/s':>6} {'RssAnon GB':>11} {'÷ limit':>8}  rc")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"{name:<22} skipped: {r['skipped']}")
            continue
        print(
            f"{name:<22} {r['input_gb']:>9.2f} {r['wall_s']:>8.1f} {r['cpu_s']:>7.1f} {r['read_gb_per_s']:>6.2f} "
            f"{r['peak_rss_anon_gb']:>11.2f} {r['peak_rss_anon_over_limit']:>8.2f}  {r['rc']}"
        )
    for k, v in (res.get("ratios") or {}).items():
        print(f"  {k}: {_f(v, '{:.3f}')}")


# --------------------------------------------------------------------------- self-check


def self_check() -> None:
    """Floor and generators against an independent torch oracle, on a tiny 2-shard checkpoint."""
    import fishmerge.fisher.store as fs
    import torch
    from fishmerge.io.checkpoint import model_fingerprint
    from safetensors.torch import load_file

    global SHARD_BYTES, GEN_SLAB_ELEMS, FLOOR_SLAB_ELEMS
    saved = SHARD_BYTES, GEN_SLAB_ELEMS, FLOOR_SLAB_ELEMS
    SHARD_BYTES, GEN_SLAB_ELEMS, FLOOR_SLAB_ELEMS = 200_000, 4096, 700  # many shards/slabs, unaligned
    old_chunk = fs.CHUNK_ELEMS
    fs.CHUNK_ELEMS = 1000  # several Fisher chunks per tensor, with a partial last chunk
    try:
        tmp = Path(tempfile.mkdtemp(prefix="fishmerge-mt-check-"))
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=301,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
            dtype="bfloat16",
        )
        models, fishers = [], []
        for i in range(3):
            write_model(tmp / f"m{i}", cfg, seed=i)
            write_fisher(tmp / f"m{i}.fisher.zarr", tmp / f"m{i}", seed=1000 + i)
            models.append(tmp / f"m{i}")
            fishers.append(tmp / f"m{i}.fisher.zarr")
        assert (tmp / "m0" / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
        layout = dict(checkpoint_layout(cfg))
        sd = [{} for _ in models]
        for i, m in enumerate(models):
            for f in sorted(m.glob("*.safetensors")):
                sd[i].update(load_file(f))
        assert {k: tuple(v.shape) for k, v in sd[0].items()} == layout, "checkpoint keys/shapes != LlamaForCausalLM"
        assert all(v.dtype == torch.bfloat16 for v in sd[0].values())
        fis = [fs.read_fisher(str(f)) for f in fishers]
        g = fs.open_fisher_store(str(fishers[1]))
        assert g.attrs["model_fingerprint"] == model_fingerprint(models[1])
        assert all((v > 0).all() for v in fis[0].values())
        w = [1.0, 2.0, 1.0]
        for with_f in (False, True):
            out = tmp / f"floor-{with_f}.safetensors"
            floor_merge([str(m) for m in models], [str(f) for f in fishers] if with_f else None, w, str(out))
            got = load_file(out)
            lam = torch.tensor(w, dtype=torch.float64) / sum(w)
            for k in layout:
                th = torch.stack([s[k].double() for s in sd])
                if with_f:
                    ff = torch.stack([torch.from_numpy(f[k]).double() for f in fis])
                    lw = lam.view(-1, *[1] * (th.dim() - 1))
                    ref = (lw * ff * th).sum(0) / (lw * ff).sum(0)
                else:
                    ref = torch.tensordot(lam, th, dims=1)
                ref = ref.to(torch.float32).to(torch.bfloat16)
                diff = (got[k].float() - ref.float()).abs()
                tol = ref.float().abs() * 2**-7 + 1e-30  # one bf16 ulp per element: fp32 vs fp64 accumulation
                bad = int((diff > tol).sum())
                assert bad == 0, f"floor {'fisher' if with_f else 'models'} '{k}': {bad} elements off by > 1 ulp"
        shutil.rmtree(tmp)
    finally:
        fs.CHUNK_ELEMS = old_chunk
        SHARD_BYTES, GEN_SLAB_ELEMS, FLOOR_SLAB_ELEMS = saved
    print("self-check ok: checkpoint layout, bf16 shards + index, Fisher stores, both floors match the oracle")


# --------------------------------------------------------------------------- main


def main() -> None:
    from fishmerge.sizes import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=None, help="bf16 size of each model (default 1.1; --big: 6)")
    ap.add_argument("--models", type=int, default=None, help="number of models (default 3; --big: 2)")
    ap.add_argument("--memory-limit", default="2GB", help="fishmerge's memory_limit (default 2GB)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every step (best wall kept)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--skip-fishmerge", action="store_true", help="only the floor and mergekit")
    ap.add_argument("--big", action="store_true", help="the larger-than-RAM fisher merge (≈36 GB of inputs)")
    ap.add_argument("--keep", action="store_true", help="keep --big inputs and merge outputs")
    ap.add_argument("--warm-cache", action="store_true", help="do not evict inputs from the page cache")
    ap.add_argument("--inputs-only", action="store_true", help="generate (or check) the inputs and stop")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/ (JSON and markdown)")
    ap.add_argument("--self-check", action="store_true", help="check floor and generators on a tiny model")
    ap.add_argument("--render-doc", action="store_true", help="rewrite the docs section from the JSON and stop")
    ap.add_argument("--floor-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_worker:
        spec = json.loads(Path(args.floor_worker).read_text())
        n = floor_merge(spec["models"], spec["fishers"], spec["weights"], spec["out"])
        print(f"floor: read {n / GB:.3f} GB of tensors")
        return
    if args.self_check:
        self_check()
        return
    if args.render_doc:
        write_doc(json.loads(JSON_OUT.read_text()))
        return
    args.size_gb = args.size_gb or (6.0 if args.big else 1.1)
    args.models = args.models or (2 if args.big else 3)
    args.memory_limit_bytes = parse_size(args.memory_limit)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if args.inputs_only:
        inp = make_inputs(args.size_gb, args.models, BENCH_DIR / "big" if args.big else BENCH_DIR)
        print(f"inputs: {inp.root}: models {inp.model_bytes / GB:.2f} GB, Fishers {inp.fisher_bytes / GB:.2f} GB")
        return
    res = big_run(args) if args.big else standard_run(args)
    print_table(res)
    if not args.no_write:
        data = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {}
        data["big" if args.big else "standard"] = res
        JSON_OUT.write_text(json.dumps(data, indent=2) + "\n")
        write_doc(data)
        print(f"wrote {JSON_OUT.relative_to(ROOT)} and the 'Merge throughput' section of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
