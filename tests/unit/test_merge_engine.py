"""Acceptance tests of the out-of-core merge engine at the library level
(load_merge_config → build_plan → execute), on tiny real BERT classifiers whose heads differ in
size, against independent in-memory numpy references of each formula.

The references read the input safetensors whole (float64; bf16 widened by torch), apply the
formula vectorised over whole tensors as the brief defines it, and never call fishmerge.merge.methods.
fp32 outputs must match to 1e-6 (norm-wise, and elementwise within a few fp32 ulps of the inputs'
magnitude); bf16 outputs must equal the reference rounded to fp32 then cast by torch, except
where the exact value lies within fp32 rounding of a bf16 rounding midpoint (≤ 1 ulp). Those
exceptions are counted in two kinds: exact ties (fp32(reference) is itself a bf16 midpoint, common
on bf16 inputs with decimal λ: the λ's binary rounding decides; not bounded) and the others (< 0.1%).
With dyadic λ on bf16 inputs the fp32 arithmetic is exact and no exception is allowed.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fishmerge.errors import FishmergeError
from fishmerge.fisher.store import begin_store, commit_store, write_fisher_store
from fishmerge.io.checkpoint import cached_model_fingerprint
from fishmerge.merge.config import load_merge_config
from fishmerge.merge.executor import execute
from fishmerge.merge.plan import build_plan
from safetensors.torch import load_file

from tests.conftest import make_tokenizer, save_model_dir
from tests.tiny_models import _bert_cfg

NAMES = ("a", "b", "c")  # three fine-tuned classifiers of one pretrained body
LABELS = {"a": 3, "b": 2, "c": 4}  # heads of different sizes: never merged
VARIANTS = ("fp32", "fp32-sharded", "bf16", "bf16-sharded")
EPS32 = 2.0**-23  # fp32 ulp at 1
ULPS = 8  # fp32 rounding allowance of an fp32 implementation, in ulps of the inputs' magnitude
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- inputs


def _jitter(model: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def _models() -> dict[str, torch.nn.Module]:
    """A 'pretrained' BertModel, the same body with a 2-label head (a prefixed base), and three
    classifiers fine-tuned from it (body + small noise, each its own head)."""
    import transformers as tf

    torch.manual_seed(0)
    pre = tf.BertModel(_bert_cfg()).eval()
    _jitter(pre, 0.1)  # LayerNorm weights/biases are 1/0 at init: make every tensor non-trivial
    out: dict[str, torch.nn.Module] = {"base": pre}
    base_cls = tf.BertForSequenceClassification(_bert_cfg(num_labels=2)).eval()
    base_cls.bert.load_state_dict(pre.state_dict())
    out["base_cls"] = base_cls
    for seed, name in enumerate(NAMES, start=1):
        torch.manual_seed(seed)
        m = tf.BertForSequenceClassification(_bert_cfg(num_labels=LABELS[name])).eval()
        m.bert.load_state_dict(pre.state_dict())
        _jitter(m, 0.02)
        out[name] = m
    return out


def _save(model: torch.nn.Module, path: Path, variant: str) -> Path:
    m = copy.deepcopy(model)
    if variant.startswith("bf16"):
        m = m.to(torch.bfloat16)
    m.config.pad_token_id = 0
    path.mkdir(parents=True)
    m.save_pretrained(path, max_shard_size="20KB" if variant.endswith("sharded") else "5GB")
    make_tokenizer(path).save_pretrained(path)
    return path


@functools.cache
def load64(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (all shards), whole, as float64."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update({k: t.double().numpy() for k, t in load_file(f).items()})
    return out


def load_torch(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _fisher_values(name: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Random positive Fishers with exact zeros: row 0 / the first entries in every model (the floor
    decides), row 1 of `a` only, the last vocabulary rows of b and c, all of b's token types."""
    rng = np.random.default_rng(100 + NAMES.index(name))
    out = {}
    for key, shape in shapes.items():
        f = (rng.random(shape) ** 2).astype(np.float32)
        if f.ndim == 2:
            f[0] = 0
            if name == "a":
                f[1] = 0
            if name != "a" and "word_embeddings" in key:
                f[-7:] = 0
        elif f.ndim == 1:
            f[:3] = 0
        if name == "b" and "token_type_embeddings" in key:
            f[:] = 0
        out[key] = f
    return out


def write_store(uri: Path, tensors: dict, model_dir: Path, chunk_rows: int | None = None, **attrs) -> str:
    """A v1 Fisher store of `model_dir`: via write_fisher_store, or written with Zarr directly
    (row chunks of `chunk_rows`, no finiteness check) to make odd chunkings and NaN stores."""
    full = {
        "estimator": "synthetic",
        "n_examples": 1,
        "model_fingerprint": cached_model_fingerprint(model_dir),
        "data_fingerprint": "synthetic",
        **attrs,
    }
    if chunk_rows is None:
        return write_fisher_store(str(uri), tensors, full)
    staging, group = begin_store(str(uri))
    for key, v in tensors.items():
        chunks = (min(chunk_rows, v.shape[0]), *v.shape[1:]) if v.ndim else ()
        arr = group.create_array(name=key, shape=v.shape, dtype="float32", chunks=chunks, compressors=None)
        arr[...] = v
    return commit_store(staging, str(uri), group, full)


@dataclass
class Zoo:
    root: Path
    dirs: dict[str, dict[str, Path]] = field(default_factory=dict)
    stores: dict[str, dict[str, str]] = field(default_factory=dict)
    fishers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    z = Zoo(tmp_path_factory.mktemp("zoo"))
    z.models = _models()
    for variant in VARIANTS:
        z.dirs[variant] = {name: _save(m, z.root / variant / name, variant) for name, m in z.models.items()}
    for name in NAMES:
        shapes = {k: tuple(v.shape) for k, v in load64(str(z.dirs["fp32"][name])).items()}
        z.fishers[name] = _fisher_values(name, shapes)
    # A fingerprint hashes tensor contents, not file layout: one store serves a model sharded or not.
    # fp32 stores have 5-row chunks (blocks straddle them); bf16 stores come from write_fisher_store.
    for family, chunk_rows in (("fp32", 5), ("bf16", None)):
        stores = {
            name: write_store(z.root / f"{family}-{name}.zarr", z.fishers[name], z.dirs[family][name], chunk_rows)
            for name in NAMES
        }
        z.stores[family] = z.stores[f"{family}-sharded"] = stores
    return z


def write_config(path: Path, zoo: Zoo, variant: str, method: str, weights, **top) -> Path:
    models = []
    for name, w in zip(NAMES, weights):
        m = {"name": name, "path": str(zoo.dirs[variant][name]), "weight": w}
        if method == "fisher":
            m["fisher"] = zoo.stores[variant][name]
        models.append(m)
    raw = {"name": f"{method}-{variant}", "method": method, "models": models, "output": str(path.parent / "out")}
    raw.update({k: v for k, v in top.items() if v is not None})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(cfg_path: Path, block: int | None = None, **plan_kw):
    plan = build_plan(load_merge_config(cfg_path), **plan_kw)
    if block is not None:
        plan.block_elems = block  # the executor's row-block size (normally fitted to memory_limit)
    summary = execute(plan, progress=False, overwrite=plan_kw.get("overwrite", False))
    return plan, summary


# ---------------------------------------------------------------- references (float64, whole tensors)


def shared_keys(dirs: list[Path]) -> list[str]:
    """Body tensors (under `bert.`) present in every model with one shape."""
    ckpts = [load64(str(d)) for d in dirs]
    keys = [k for k in ckpts[0] if k.startswith("bert.") and all(k in c for c in ckpts)]
    return [k for k in keys if len({c[k].shape for c in ckpts}) == 1]


def base_value(base: dict[str, np.ndarray], key: str) -> np.ndarray:
    return base[key] if key in base else base[key.removeprefix("bert.")]


def reference(method: str, thetas, weights, target: int, keys, *, fishers=None, base=None, opt=None):
    """key -> (exact merged value, magnitude of the computation per element, ill-conditioned elements)
    for target `target`. Only TIES has ill-conditioned elements: where the elected sign's sum is within
    fp32 rounding of 0 (e.g. 0.6·τ_b = −0.9·τ_c exactly on a bf16 grid), any fp32 implementation may
    elect either sign; those are counted and must be rare."""
    opt = opt or {}
    w = np.asarray(weights, dtype=np.float64)
    out = {}
    if method == "fisher":
        lam = w / w.sum()
        if opt.get("normalize", False):
            norms = np.array(
                [math.sqrt(sum(float((f[k].astype(np.float64) ** 2).sum()) for k in keys)) for f in fishers]
            )
            lam = lam / norms
        floor, favor = opt.get("floor", 1e-6), opt.get("favor_target", True)
    for key in keys:
        T = np.stack([t[key] for t in thetas])
        lw = (slice(None),) + (None,) * (T.ndim - 1)
        if method == "isotropic":
            lam = w / w.sum()
            out[key] = ((lam[lw] * T).sum(0), (lam[lw] * np.abs(T)).sum(0), None)
        elif method == "fisher":
            F = np.stack([f[key] for f in fishers]).astype(np.float64)
            floored = np.maximum(F, floor)
            if favor:  # the floor only on the target: ~0 Fisher everywhere keeps the target's value
                floored = np.where(np.arange(len(F))[lw] == target, floored, F)
            wf = lam[lw] * floored
            den, num = wf.sum(0), (wf * T).sum(0)
            value = np.where(den > 0, num / np.where(den > 0, den, 1.0), T[target])
            out[key] = (value, np.abs(T).max(0), None)
        elif method == "task_arithmetic":
            b = base_value(base, key)
            s = opt.get("scale", 1.0)
            out[key] = (b + s * (w[lw] * (T - b)).sum(0), np.abs(b) + abs(s) * (w[lw] * np.abs(T - b)).sum(0), None)
        elif method == "ties":
            b = base_value(base, key)
            s, density = opt.get("scale", 1.0), opt.get("density", 0.2)
            tau = T - b
            # Rank magnitudes of the fp32 task vectors (what an fp32 checkpoint's task vector is); keep
            # every entry ≥ the k-th largest, k = ⌊density·n⌋ (mergekit's rule, at least 1), by a full sort.
            mag = np.abs(T.astype(np.float32) - b.astype(np.float32))
            kept = np.zeros_like(tau)
            for i in range(len(T)):
                k = max(1, math.floor(density * mag[i].size))
                thr = np.sort(mag[i].ravel())[::-1][k - 1]
                kept[i] = np.where(mag[i] >= thr, tau[i], 0.0)
            weighted = w[lw] * kept
            total, spread = weighted.sum(0), np.abs(weighted).sum(0)
            elected = np.sign(total)
            fragile = (spread > 0) & (np.abs(total) <= ULPS * EPS32 * spread)
            agree = (np.sign(weighted) == elected) & (weighted != 0)
            num = (weighted * agree).sum(0)
            den = (w[lw] * agree).sum(0)
            merged = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
            out[key] = (b + s * merged, np.abs(b) + abs(s) * np.abs(tau).max(0), fragile)
        else:
            raise AssertionError(method)
    return out


def to_bf16(x: np.ndarray) -> torch.Tensor:
    """The reference as the brief defines a bf16 output: rounded to fp32, then cast by torch."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)


def _ordered(bits: torch.Tensor) -> np.ndarray:
    """bf16 bit patterns as integers ordered like the values (distance = ulps)."""
    b = bits.view(torch.int16).numpy().astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFF), b)


def check_target(
    out_dir: Path, in_dir: Path, ref: dict, out_dtype: str | None, *, exact: bool = False, skip_fragile: bool = True
) -> Counter:
    """The target folder holds exactly the target's tensors: its head copied (cast only when asked),
    the merged body equal to the reference (see the module docstring). Returns counts for reporting.

    bf16: every value must be the bf16 rounding of some value within fp32 error (`tol`) of the exact
    result, i.e. the reference cast (`want`) except where the exact value lies within `tol` of a bf16
    rounding midpoint. Those exceptions are split into exact ties (fp32(ref) is itself a midpoint:
    structural on bf16 inputs with decimal λ, where the λ's binary representation decides) and
    others (< 0.1%); all are ≤ 1 ulp away except results within `tol` of 0 (cancellation).
    `exact`: the fp32 computation is exact (dyadic λ on bf16 inputs): no exception at all.
    `skip_fragile`: leave out (and count) the reference's ill-conditioned elements.
    """
    got = load_torch(out_dir)
    inp = load_torch(in_dir)
    assert set(got) == set(inp)
    stats: Counter = Counter()
    for key, t in inp.items():
        want_dtype = TORCH[out_dtype] if out_dtype else t.dtype
        assert got[key].dtype == want_dtype, key
        if key not in ref:  # the target's own head
            assert not key.startswith("bert."), key
            assert torch.equal(got[key], t.to(want_dtype)), key
            continue
        value, mag, fragile = ref[key]
        ok = ~fragile if fragile is not None and skip_fragile else np.ones(value.shape, bool)
        tol = ULPS * EPS32 * mag
        if want_dtype == torch.float32:
            g = got[key].double().numpy()
            err = np.abs(g - value)[ok]
            rel = np.linalg.norm(err) / max(np.linalg.norm(value[ok]), 1e-30)
            assert rel <= 1e-6, (key, rel)
            assert (err <= tol[ok]).all(), (key, float(err.max()))
        else:
            g, want = _ordered(got[key]), _ordered(to_bf16(value))
            lo, hi = _ordered(to_bf16(value - tol)), _ordered(to_bf16(value + tol))
            mismatch = (g != want) & ok
            if exact:
                assert not mismatch.any(), (key, int(mismatch.sum()))
            assert ((lo <= g) & (g <= hi))[ok].all(), (key, int((~((lo <= g) & (g <= hi)) & ok).sum()))
            far = mismatch & (np.abs(g - want) > 1)
            assert not (far & (np.abs(value) > tol)).any(), (key, int(far.sum()))
            tie = (np.ascontiguousarray(value, dtype=np.float32).view(np.uint32) & 0xFFFF) == 0x8000
            stats["exact_tie_mismatches"] += int((mismatch & tie).sum())
            stats["other_mismatches"] += int((mismatch & ~tie).sum())
            stats["near_zero_mismatches"] += int(far.sum())
        stats["ill_conditioned"] += int((~ok).sum())
        stats["elements"] += value.size
    assert stats["other_mismatches"] <= 1e-3 * stats["elements"], stats
    assert stats["ill_conditioned"] <= 1e-3 * stats["elements"], stats
    return stats


# ---------------------------------------------------------------- 1. every method against its reference


@dataclass(frozen=True)
class Case:
    method: str
    variant: str
    block: int
    weights: tuple
    targets: tuple | None = None
    dtype: str | None = None  # output dtype override
    opt: dict = field(default_factory=dict)
    # dyadic λ on bf16 inputs: sums of weighted inputs are exact in fp32, so the elected TIES sign is
    # never ill-conditioned, and isotropic / task_arithmetic outputs (no division) must equal the reference
    dyadic: bool = False

    @property
    def id(self) -> str:
        return f"{self.method}-{self.variant}-b{self.block}" + (f"-to-{self.dtype}" if self.dtype else "")


CASES = [
    # fisher: floor / favor_target / normalize combinations; with λ_c = 0 and favor_target, Σλ·F̃ = 0 for
    # target c where a and b have no Fisher mass (row 0, vocabulary rows): c keeps its values there.
    Case("fisher", "fp32", 2048, (0.5, 0.3, 0.2), ("a", "c"), opt={"floor": 1e-3}),
    Case("fisher", "fp32-sharded", 256, (1.0, 2.0, 1.0), opt={"floor": 1e-4, "favor_target": False, "normalize": True}),
    Case("fisher", "fp32", 10**6, (0.6, 0.4, 0.0), ("c", "a"), opt={"normalize": True}),
    Case("fisher", "bf16-sharded", 40, (0.2, 0.3, 0.5), ("b", "c"), opt={"floor": 1e-3}),
    Case("fisher", "bf16", 10**6, (1.0, 1.0, 1.0), opt={"floor": 1e-2, "favor_target": False}),
    Case("fisher", "bf16", 2048, (0.5, 0.3, 0.2), ("a",), "float32", {"floor": 1e-3}),
    Case("fisher", "fp32-sharded", 96, (0.5, 0.3, 0.2), ("a", "b"), "bfloat16", {"floor": 1e-3}),
    Case("isotropic", "fp32", 7, (0.5, 0.3, 0.2), ("a", "b")),
    Case("isotropic", "fp32-sharded", 96, (1.0, 2.0, 3.0)),
    Case("isotropic", "bf16-sharded", 10**6, (0.5, 0.3, 0.2), ("c",)),
    Case("isotropic", "bf16", 7, (0.5, 0.25, 0.25), ("a", "b"), dyadic=True),
    Case("isotropic", "bf16", 40, (0.2, 0.2, 0.6), ("a",)),
    Case("isotropic", "bf16-sharded", 96, (0.5, 0.3, 0.2), ("b",), "float32"),
    Case("isotropic", "fp32", 10**6, (0.5, 0.3, 0.2), ("a", "c"), "bfloat16"),
    Case("task_arithmetic", "fp32", 7, (0.5, 0.8, 0.3), ("a", "b")),
    Case("task_arithmetic", "fp32-sharded", 96, (1.0, 1.0, 1.0), opt={"scale": 0.7}),
    Case("task_arithmetic", "bf16-sharded", 10**6, (0.3, 0.3, 0.3), ("c",), opt={"scale": 1.3}),
    Case("task_arithmetic", "bf16", 7, (0.5, 0.75, 0.25), ("b", "c"), opt={"scale": 0.5}, dyadic=True),
    Case("task_arithmetic", "bf16", 96, (0.5, 0.8, 0.3), ("a",), "float32"),
    Case("task_arithmetic", "fp32-sharded", 10**6, (0.5, 0.8, 0.3), ("a", "b"), "bfloat16", {"scale": 0.9}),
    # ties: the thresholds come from two streaming histogram passes over row blocks
    Case("ties", "fp32", 512, (1.0, 0.5, 0.8), ("a", "b"), opt={"density": 0.2}),
    Case("ties", "fp32-sharded", 1024, (1.0, 1.0, 1.0), opt={"density": 0.5, "scale": 1.2}),
    Case("ties", "bf16-sharded", 10**6, (0.3, 0.6, 0.9), ("c",), opt={"density": 0.3}),
    Case("ties", "bf16", 4096, (1.0, 0.5, 0.75), ("a", "c"), opt={"density": 1.0, "scale": 0.8}, dyadic=True),
    Case("ties", "bf16", 2048, (1.0, 0.5, 0.8), ("b",), "float32", {"density": 0.2}),
    Case("ties", "fp32", 10**6, (1.0, 0.5, 0.8), ("a", "b"), "bfloat16", {"density": 0.4}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_method_matches_reference(zoo: Zoo, case: Case, tmp_path: Path) -> None:
    dirs = zoo.dirs[case.variant]
    fisher_opts = {k: case.opt[k] for k in ("floor", "favor_target", "normalize") if k in case.opt}
    base_name = {"task_arithmetic": "base", "ties": "base_cls"}.get(case.method)  # unprefixed / prefixed keys
    cfg = write_config(
        tmp_path / "merge.yaml",
        zoo,
        case.variant,
        case.method,
        case.weights,
        base=str(dirs[base_name]) if base_name else None,
        targets=list(case.targets) if case.targets else None,
        dtype=case.dtype,
        fisher=fisher_opts or None,
        scale=case.opt.get("scale"),
        density=case.opt.get("density"),
    )
    plan, summary = run(cfg, case.block)

    model_dirs = [dirs[n] for n in NAMES]
    keys = shared_keys(model_dirs)
    assert set(plan.shared) == set(keys)
    targets = list(case.targets or NAMES)
    assert [t.name for t in plan.targets] == targets
    for t in plan.targets:
        assert set(t.own_keys) == {"classifier.weight", "classifier.bias"}
    from transformers import AutoConfig

    rows = sum(load64(str(dirs["a"]))[k].shape[0] for k in keys if load64(str(dirs["a"]))[k].ndim == 2)
    if case.block == 7:  # every 2-D row and 1-D runs of ≤ 7 elements are separate blocks
        assert summary["blocks"] > rows
    if case.block == 10**6:  # one block per tensor
        assert summary["blocks"] == len(keys) + 2 * len(targets)

    thetas = [load64(str(d)) for d in model_dirs]
    base = load64(str(dirs[base_name])) if base_name else None
    fishers = [zoo.fishers[n] for n in NAMES] if case.method == "fisher" else None
    out = Path(summary["output"])
    for name in targets:
        ref = reference(
            case.method, thetas, case.weights, NAMES.index(name), keys, fishers=fishers, base=base, opt=case.opt
        )
        exact = case.dyadic and case.method in ("isotropic", "task_arithmetic")
        stats = check_target(out / name, dirs[name], ref, case.dtype, exact=exact, skip_fragile=not case.dyadic)
        config = json.loads((out / name / "config.json").read_text())
        assert config["dtype"] == (case.dtype or ("bfloat16" if case.variant.startswith("bf16") else "float32"))
        assert AutoConfig.from_pretrained(out / name).num_labels == LABELS[name]  # the target's own config
        print(case.id, name, dict(stats))
    assert not list(out.parent.glob(".out.staging-*"))


# ---------------------------------------------------------------- 2. special Fishers


def _stores_with(zoo: Zoo, root: Path, values: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    return {n: write_store(root / f"{n}.zarr", values[n], zoo.dirs["fp32"][n]) for n in NAMES}


def _config_with_stores(path: Path, zoo: Zoo, method: str, weights, stores, **top) -> Path:
    cfg = write_config(path, zoo, "fp32", method, weights, **top)
    raw = yaml.safe_load(cfg.read_text())
    for m in raw["models"]:
        if method == "fisher":
            m["fisher"] = stores[m["name"]]
    raw["output"] = str(path.parent / f"out-{method}")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_equal_fishers_give_the_isotropic_merge(zoo: Zoo, tmp_path: Path) -> None:
    """Equal Fishers: the fisher merge is the isotropic one. Not bit-identical: the engine computes
    θ_t + Σλᵢ F̃ᵢ(θᵢ − θ_t)/Σλᵢ F̃ᵢ, isotropic Σλᵢθᵢ, so fp32 rounding differs (measured: ~30% of
    elements differ, by ≤ 1 ulp of the inputs' magnitude; both within 1e-7 of the exact value).
    Asserted: heads identical, and both merges within 2 ulps of the inputs' magnitude of each other."""
    rng = np.random.default_rng(7)
    same = {
        k: (rng.random(v.shape) + 0.5).astype(np.float32) for k, v in zoo.fishers["a"].items() if k.startswith("bert.")
    }
    stores = _stores_with(zoo, tmp_path, {n: same for n in NAMES})
    weights, targets = (0.5, 0.3, 0.2), ["a", "b"]
    _, fis = run(_config_with_stores(tmp_path / "f.yaml", zoo, "fisher", weights, stores, targets=targets), 2048)
    _, iso = run(_config_with_stores(tmp_path / "i.yaml", zoo, "isotropic", weights, stores, targets=targets), 2048)
    keys = shared_keys([zoo.dirs["fp32"][n] for n in NAMES])
    thetas = [load64(str(zoo.dirs["fp32"][n])) for n in NAMES]
    ref = reference("isotropic", thetas, weights, 0, keys)
    worst = 0.0
    for name in targets:
        f = load_torch(Path(fis["output"]) / name)
        i = load_torch(Path(iso["output"]) / name)
        check_target(Path(fis["output"]) / name, zoo.dirs["fp32"][name], ref, None)
        for key in f:
            if key not in ref:
                assert torch.equal(f[key], i[key]), key
                continue
            scale = EPS32 * np.abs(np.stack([t[key] for t in thetas])).max(0)
            worst = max(worst, float((np.abs(f[key].double().numpy() - i[key].double().numpy()) / scale).max()))
    print(f"fisher(equal F) vs isotropic: max |difference| = {worst:.2f} ulps of the inputs' magnitude")
    assert worst <= 2.0


def test_zero_fisher_everywhere_with_favor_target_keeps_each_target(zoo: Zoo, tmp_path: Path) -> None:
    zeros = {k: np.zeros_like(v) for k, v in zoo.fishers["a"].items() if k.startswith("bert.")}
    stores = _stores_with(zoo, tmp_path, {n: zeros for n in NAMES})
    # c has λ = 0: Σλ·F̃ = 0 everywhere for target c, and = λ_a·floor for target a.
    cfg = _config_with_stores(
        tmp_path / "z.yaml", zoo, "fisher", (0.5, 0.5, 0.0), stores, targets=["a", "c"], fisher={"favor_target": True}
    )
    _, summary = run(cfg, 7)
    for name in ("a", "c"):
        got, want = load_torch(Path(summary["output"]) / name), load_torch(zoo.dirs["fp32"][name])
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------- 3. merged models load and run


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n, t in ((4, 12), (3, 20)):
        ids = torch.randint(5, 97, (n, t), generator=g)
        mask = torch.ones(n, t, dtype=torch.long)
        mask[0, t // 2 :] = 0
        ids[mask == 0] = 0
        types = torch.zeros(n, t, dtype=torch.long)
        types[:, t // 3 :] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return out


@pytest.mark.parametrize("method", ["isotropic", "fisher"])
def test_merged_model_loads_and_matches_the_reference_model(zoo: Zoo, method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    variant = "fp32-sharded"
    dirs = zoo.dirs[variant]
    # isotropic over a and b with λ = (½, ½) is exactly representable: fl(½a + ½b) is one rounding of
    # the exact value, so the reference state dict is bit-exact and logits must be equal.
    weights = (1.0, 1.0, 0.0) if method == "isotropic" else (0.5, 0.3, 0.2)
    cfg = write_config(
        tmp_path / "m.yaml",
        zoo,
        variant,
        method,
        weights,
        targets=["a", "b"],
        shard_size="40KB",
        fisher={"floor": 1e-3} if method == "fisher" else None,
    )
    plan, summary = run(cfg)
    keys = shared_keys([dirs[n] for n in NAMES])
    thetas = [load64(str(dirs[n])) for n in NAMES]
    for name in ("a", "b"):
        out = Path(summary["output"]) / name
        assert (out / "model.safetensors.index.json").exists()  # the output is sharded too
        ref = reference(
            method,
            thetas,
            weights,
            NAMES.index(name),
            keys,
            fishers=[zoo.fishers[n] for n in NAMES],
            opt={"floor": 1e-3},
        )
        state = {k: torch.from_numpy(v.astype(np.float32)) for k, (v, _, _) in ref.items()}
        merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
        reference_model = AutoModelForSequenceClassification.from_pretrained(dirs[name]).eval()
        own = load_torch(dirs[name])
        reference_model.load_state_dict({**own, **state}, strict=True)
        files = load_torch(out)
        loaded = merged.state_dict()
        for key, value in files.items():  # nothing re-initialised, nothing left out
            assert torch.equal(loaded[key], value), key
        with torch.no_grad():
            for batch in _batches():
                got = merged(**batch).logits
                want = reference_model(**batch).logits
                assert got.shape[-1] == LABELS[name]
                if method == "isotropic":
                    assert torch.equal(got, want)
                else:  # parameters agree to ~1e-7 relative (fp32 rounding of the formula)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 4. bad input, at the library level


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    import transformers as tf

    root = tmp_path_factory.mktemp("odd")
    out = {}
    for name, attr, value in (("vocab", "vocab_size", 120), ("wide", "intermediate_size", 64)):
        cfg = _bert_cfg(num_labels=3)
        setattr(cfg, attr, value)
        torch.manual_seed(9)
        out[name] = _save(tf.BertForSequenceClassification(cfg).eval(), root / name, "fp32")
    out["gpt2"] = save_model_dir(root / "gpt2", "gpt2-cls", 0)
    return out


def _raw_config(path: Path, models: list[dict], **top) -> Path:
    raw = {"name": "bad", "method": "isotropic", "models": models, "output": str(path.parent / "out"), **top}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _plan_error(cfg: Path, **kw) -> str:
    with pytest.raises(FishmergeError) as err:
        build_plan(load_merge_config(cfg), **kw)
    return str(err.value)


def test_shape_mismatch_lists_every_mismatched_tensor(zoo: Zoo, odd_models, tmp_path: Path) -> None:
    dirs = [zoo.dirs["fp32"]["a"], odd_models["vocab"], odd_models["wide"]]
    models = [{"name": n, "path": str(d)} for n, d in zip(("a", "vocab", "wide"), dirs)]
    msg = _plan_error(_raw_config(tmp_path / "m.yaml", models))
    ckpts = [load64(str(d)) for d in dirs]
    expected = [k for k in ckpts[0] if k.startswith("bert.") and len({c[k].shape for c in ckpts}) > 1]
    assert len(expected) == 1 + 3 * 2  # word embeddings; per layer intermediate.dense weight+bias, output.dense weight
    for key in expected:
        assert key in msg, (key, msg)
    assert f"{len(expected)} tensor(s) differ in shape" in msg
    assert "vocabulary sizes" in msg and "120" in msg and "97" in msg
    assert "classifier" not in msg  # heads may differ


def test_architecture_mismatch(zoo: Zoo, odd_models, tmp_path: Path) -> None:
    models = [{"name": "a", "path": str(zoo.dirs["fp32"]["a"])}, {"name": "g", "path": str(odd_models["gpt2"])}]
    msg = _plan_error(_raw_config(tmp_path / "m.yaml", models))
    assert "architectures differ" in msg and "bert" in msg and "gpt2" in msg


@pytest.mark.parametrize(
    "method, weights, needles",
    [
        ("task_arithmetic", (0.5, 0.5), ["needs `base:`"]),
        ("isotropic", (-0.5, 1.0), ["weight must be ≥ 0"]),
        ("isotropic", (0.0, 0.0), ["sum to 0"]),
    ],
)
def test_config_errors(zoo: Zoo, tmp_path: Path, method, weights, needles) -> None:
    models = [{"name": n, "path": str(zoo.dirs["fp32"][n]), "weight": w} for n, w in zip(NAMES, weights)]
    with pytest.raises(FishmergeError) as err:
        load_merge_config(_raw_config(tmp_path / "m.yaml", models, method=method))
    for needle in needles:
        assert needle in str(err.value)


def test_fisher_store_of_another_model(zoo: Zoo, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "m.yaml", zoo, "fp32", "fisher", (0.5, 0.3, 0.2))
    raw = yaml.safe_load(cfg.read_text())
    raw["models"][1]["fisher"] = zoo.stores["fp32"]["a"]
    cfg.write_text(yaml.safe_dump(raw))
    msg = _plan_error(cfg)
    assert "model 'b'" in msg and "computed for another model" in msg


def test_nan_in_fisher_values_fails_at_execute_and_leaves_nothing(zoo: Zoo, tmp_path: Path) -> None:
    values = {k: v.copy() for k, v in zoo.fishers["b"].items()}
    values["bert.encoder.layer.1.output.dense.weight"][5, 7] = np.nan
    stores = dict(zoo.stores["fp32"])
    stores["b"] = write_store(tmp_path / "nan.zarr", values, zoo.dirs["fp32"]["b"], chunk_rows=4)
    cfg = _config_with_stores(tmp_path / "m.yaml", zoo, "fisher", (0.5, 0.3, 0.2), stores)
    plan = build_plan(load_merge_config(cfg))  # values are not read when planning
    plan.block_elems = 96
    with pytest.raises(FishmergeError) as err:
        execute(plan, progress=False)
    msg = str(err.value)
    assert "NaN" in msg and "bert.encoder.layer.1.output.dense.weight" in msg and "'b'" in msg
    assert not Path(plan.output).exists()
    assert not Path(plan.staging).exists()
    assert not list(tmp_path.glob(".out-fisher.staging-*"))


def test_nan_in_fisher_tensor_stats_fails_at_plan(zoo: Zoo, tmp_path: Path) -> None:
    key = "bert.encoder.layer.0.attention.self.query.weight"
    stores = dict(zoo.stores["fp32"])
    stats = {key: {"mass": float("nan"), "max": 1.0, "zeros": 0}}
    stores["c"] = write_store(tmp_path / "c.zarr", zoo.fishers["c"], zoo.dirs["fp32"]["c"], 8, tensor_stats=stats)
    msg = _plan_error(_config_with_stores(tmp_path / "m.yaml", zoo, "fisher", (0.5, 0.3, 0.2), stores))
    assert "NaN" in msg and key in msg and "model 'c'" in msg


def test_existing_output_needs_overwrite(zoo: Zoo, tmp_path: Path) -> None:
    earlier = write_config(tmp_path / "e.yaml", zoo, "fp32", "isotropic", (1.0, 2.0, 1.0), targets=["a"])
    run(earlier)  # an earlier fishmerge merge sits at the output
    cfg = write_config(tmp_path / "m.yaml", zoo, "fp32", "isotropic", (1.0, 1.0, 1.0), targets=["a"])
    out = tmp_path / "out"
    msg = _plan_error(cfg)
    assert "another fishmerge merge" in msg and "--overwrite" in msg
    plan, summary = run(cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a", "fishmerge-output.json"]
    assert json.loads((out / "a" / "fishmerge.json").read_text())["plan_id"] == plan.plan_id
    assert set(load_torch(out / "a")) == set(load_torch(zoo.dirs["fp32"]["a"]))


def test_overwrite_never_replaces_a_folder_fishmerge_did_not_write(zoo: Zoo, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "m.yaml", zoo, "fp32", "isotropic", (1.0, 1.0, 1.0), targets=["a"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the user's file")
    for overwrite in (False, True):
        msg = _plan_error(cfg, overwrite=overwrite)
        assert "not a fishmerge output" in msg and "--overwrite" not in msg
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_memory_limit_too_small(zoo: Zoo, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "m.yaml", zoo, "fp32", "isotropic", (1.0, 1.0, 1.0), memory_limit="1MB")
    msg = _plan_error(cfg)
    assert "memory_limit" in msg and "too small" in msg and "Raise memory_limit" in msg


def test_not_enough_disk(zoo: Zoo, tmp_path: Path) -> None:
    """A real small filesystem (a 64 KiB tmpfs; CI and dev machines run as root) cannot hold the output."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root): the disk check is then untested")
    try:
        cfg = write_config(tmp_path / "d.yaml", zoo, "fp32", "isotropic", (1.0, 1.0, 1.0))
        text = cfg.read_text().replace(str(tmp_path / "out"), str(small / "out"))
        assert str(small / "out") in text
        cfg.write_text(text)
        msg = _plan_error(cfg)
        assert "not enough disk" in msg and str(small) in msg
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ---------------------------------------------------------------- 5. a real Dask cluster


def test_dask_cluster_output_is_byte_identical_to_threads(zoo: Zoo, tmp_path: Path) -> None:
    from distributed import LocalCluster

    variant = "fp32-sharded"
    outs = []
    for sub in ("threads", "cluster"):
        (tmp_path / sub).mkdir()
        cfg = write_config(
            tmp_path / sub / "m.yaml",
            zoo,
            variant,
            "fisher",
            (0.5, 0.3, 0.2),
            targets=["a", "c"],
            fisher={"floor": 1e-3},
        )
        plan = build_plan(load_merge_config(cfg))
        plan.block_elems = 512
        if sub == "threads":
            summary = execute(plan, progress=False)
        else:
            with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
                summary = execute(plan, address=cluster.scheduler_address, progress=False)
        outs.append(Path(summary["output"]))
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.safetensors"))
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
