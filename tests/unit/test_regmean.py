"""RegMean through the out-of-core engine (load_merge_config → build_plan → execute) against an
independent numpy RegMean, on tiny BERT classifiers (nn.Linear, 2–4 models) and GPT-2 LMs (Conv1D).

The stores are written with plain Zarr in the documented v2 layout (no fishmerge store code), with
Grams from the per-token loop of tests/oracle.py; the reference inverts Σλ G̃ with numpy (the engine
solves after a Cholesky check) and merges every other tensor by its own formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from fishmerge.errors import FishmergeError
from fishmerge.io.checkpoint import cached_model_fingerprint
from fishmerge.merge.config import load_merge_config
from fishmerge.merge.executor import execute
from fishmerge.merge.methods.regmean import SingularGramSystem
from fishmerge.merge.plan import build_plan
from fishmerge.pipeline.search import load_inputs, merge_in_memory

from tests.conftest import make_tokenizer
from tests.oracle import naive_grams
from tests.tiny_models import build
from tests.unit.test_fisher_oracle import make_examples
from tests.unit.test_merge_engine import load64

N_EXAMPLES = 48  # ≥ the widest input (the pooler counts one row per example): nonsingular Grams


def tiny(name: str, seed: int) -> torch.nn.Module:
    """A tiny model whose every tensor is non-trivial (LayerNorm at its init, γ = 1 and β = 0, would make
    the Grams of the layers it feeds singular: its outputs sum to zero)."""
    model = build(name, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def examples(model, seed: int) -> list[dict]:
    return make_examples(model, seed=10 + seed, n=N_EXAMPLES)


def save_tiny(path: Path, name: str, seed: int) -> Path:
    model = tiny(name, seed)
    model.config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path).save_pretrained(path)
    return path


def write_plain_store(uri: Path, model_dir: Path, name: str, seed: int, fisher: bool = False, **changes) -> Path:
    """A v2 store as the README documents it, written with zarr + numpy: each weight's own Gram
    (not shared), its token count and layout; random positive Fishers when `fisher`."""
    model = tiny(name, seed)
    grams = naive_grams(model, examples(model, seed))
    grams.update(changes.pop("grams", {}))
    group = zarr.open_group(str(uri), mode="w", zarr_format=3)
    gram_map = {}
    for key, (g, tokens) in grams.items():
        group.require_group("gram").create_array(key, data=g.astype(np.float32), compressors=None)
        layout = "in_out" if name.startswith("gpt2") else "out_in"
        gram_map[key] = {"array": f"gram/{key}", "tokens": int(tokens), "layout": layout}
    rng = np.random.default_rng(seed)
    if fisher:
        for key, t in load64(str(model_dir)).items():
            group.create_array(key, data=(rng.random(t.shape) + 0.01).astype(np.float32), compressors=None)
    group.attrs.update(
        {
            "format": "fishmerge.fisher",
            "format_version": 2,
            "estimator": "synthetic",
            "n_examples": 4,
            "model_fingerprint": cached_model_fingerprint(model_dir),
            "data_fingerprint": "synthetic",
            "created": "2026-12-02T00:00:00+00:00",
            "fishmerge_version": "test",
            "statistics": ["fisher", "gram"] if fisher else ["gram"],
            "grams": gram_map,
            **changes,
        }
    )
    return uri


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Four BERT classifiers and two GPT-2 LMs (same architecture each, different weights), with stores."""
    root = tmp_path_factory.mktemp("regmean")
    out = {}
    for name, count in (("bert-cls", 4), ("gpt2-lm", 2)):
        for seed in range(count):
            d = save_tiny(root / f"{name}-{seed}", name, seed)
            out[(name, seed)] = {
                "dir": d,
                "grams": write_plain_store(root / f"{name}-{seed}.zarr", d, name, seed),
                "both": write_plain_store(root / f"{name}-{seed}-f.zarr", d, name, seed, fisher=True),
            }
    return out


def config(tmp_path, family, name, seeds, weights, store="grams", **extra) -> Path:
    cfg = {
        "name": "rm",
        "method": "regmean",
        "models": [
            {
                "name": f"m{s}",
                "path": str(family[(name, s)]["dir"]),
                "weight": w,
                "fisher": str(family[(name, s)][store]),
            }
            for s, w in zip(seeds, weights)
        ],
        "output": str(tmp_path / "out"),
        "dtype": "float32",
        **extra,
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def reference(family, name, seeds, weights, alpha, rest="isotropic", target=0, floor=1e-6) -> dict[str, np.ndarray]:
    """Numpy RegMean: W* = (Σλ W G̃)(Σλ G̃)⁻¹ (Linear) or (Σλ G̃)⁻¹ Σλ G̃ W (Conv1D), G = Σxxᵀ/tokens;
    every other shared tensor by the isotropic mean or the Fisher formula (floor on the target only)."""
    lam = np.asarray(weights, dtype=np.float64) / sum(weights)
    thetas = [load64(str(family[(name, s)]["dir"])) for s in seeds]
    store = "both" if rest == "fisher" else "grams"
    groups = [zarr.open_group(str(family[(name, s)][store]), mode="r") for s in seeds]
    gmaps = [g.attrs["grams"] for g in groups]
    out = {}
    for key in thetas[0]:
        if key.startswith("classifier."):
            continue  # heads are kept per target
        ws = [t[key] for t in thetas]
        if key in gmaps[0]:
            tilde = []
            for g, gm in zip(groups, gmaps):
                mean = g[gm[key]["array"]][...].astype(np.float64) / gm[key]["tokens"]
                tilde.append(alpha * mean + (1 - alpha) * np.diag(np.diag(mean)))
            inv = np.linalg.inv(sum(lam_i * t for lam_i, t in zip(lam, tilde)))
            if gm[key]["layout"] == "out_in":
                out[key] = sum(lam_i * w @ t for lam_i, w, t in zip(lam, ws, tilde)) @ inv
            else:
                out[key] = inv @ sum(lam_i * t @ w for lam_i, w, t in zip(lam, ws, tilde))
        elif rest == "fisher":
            fs = [g[key][...].astype(np.float64) for g in groups]
            fs[target] = np.maximum(fs[target], floor)
            num = sum(lam_i * f * w for lam_i, f, w in zip(lam, fs, ws))
            out[key] = num / sum(lam_i * f for lam_i, f in zip(lam, fs))
        else:
            out[key] = sum(lam_i * w for lam_i, w in zip(lam, ws))
    return out


def merged(tmp_path, target: str) -> dict[str, np.ndarray]:
    return load64(str(tmp_path / "out" / target))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize(
    ("name", "seeds", "weights", "alpha"),
    [
        ("bert-cls", (0, 1), (0.3, 0.7), 1.0),
        ("bert-cls", (0, 1, 2), (1.0, 2.0, 0.5), 0.5),
        ("bert-cls", (0, 1, 2, 3), (1.0, 1.0, 1.0, 1.0), 0.0),
        ("gpt2-lm", (0, 1), (0.6, 0.4), 0.9),
    ],
)
def test_regmean_equals_numpy_regmean(family, tmp_path, name, seeds, weights, alpha) -> None:
    cfg = load_merge_config(config(tmp_path, family, name, seeds, weights, regmean={"alpha": alpha}))
    plan = build_plan(cfg)
    assert plan.params.rest == "isotropic"  # auto: the stores hold no Fishers
    assert plan.gram_layouts  # every Linear / Conv1D weight shared by the models
    execute(plan, progress=False)
    want = reference(family, name, seeds, weights, alpha)
    got = merged(tmp_path, "m0")
    assert set(want) <= set(got)
    for key, value in want.items():
        assert rel(got[key], value) <= 2e-5, key
    by_gram = {k for k in want if k in plan.gram_layouts}
    assert by_gram and all(rel(got[k], merged(tmp_path, "m1")[k]) == 0 for k in by_gram)  # the same for each target


def test_rest_fisher_and_auto_with_fisher_stores(family, tmp_path) -> None:
    seeds, weights = (0, 1, 2), (0.2, 0.5, 0.3)
    cfg = load_merge_config(config(tmp_path, family, "bert-cls", seeds, weights, store="both", targets=["m1"]))
    plan = build_plan(cfg)
    assert plan.params.rest == "fisher" and set(plan.statistics) == {"fisher", "gram"}
    execute(plan, progress=False)
    want = reference(family, "bert-cls", seeds, weights, 1.0, rest="fisher", target=1)
    got = merged(tmp_path, "m1")
    for key, value in want.items():
        assert rel(got[key], value) <= 2e-5, key


def test_out_of_core_with_several_tasks_equals_in_memory_bytes(family, tmp_path) -> None:
    seeds, weights = (0, 1, 2), (0.5, 0.25, 0.25)
    cfg = load_merge_config(config(tmp_path, family, "bert-cls", seeds, weights, regmean={"alpha": 0.7}))
    whole = build_plan(cfg)
    cfg.memory_limit = 450 * 2**20 + 150_000  # blocks of about 1000 elements, Gram tasks of a few rows
    small = build_plan(cfg, threads=1)
    assert small.block_elems < whole.block_elems
    from fishmerge.merge.inputs import merge_blocks

    assert len(merge_blocks(small, "bert.embeddings.word_embeddings.weight")) >= 2
    gram_blocks = {k: merge_blocks(small, k) for k in small.gram_layouts}
    assert all(len(b) >= 2 for b in gram_blocks.values()), gram_blocks  # each Linear weight in row blocks
    assert all(merge_blocks(whole, k) == [(0, whole.models[0].refs[k].rows)] for k in whole.gram_layouts)
    execute(small, progress=False)
    in_memory = merge_in_memory(whole, load_inputs(whole), whole.weights, target=0)
    got = merged(tmp_path, "m0")
    for key, value in in_memory.items():
        assert got[key].astype(np.float32).tobytes() == value.astype(np.float32).tobytes(), key


def test_planner_counts_the_grams_and_refuses_with_the_number(family, tmp_path) -> None:
    cfg = load_merge_config(config(tmp_path, family, "bert-cls", (0, 1), (1, 1)))
    cfg.memory_limit = 450 * 2**20 + 40_000  # above the baseline, below one Gram task
    with pytest.raises(FishmergeError, match=r"merging '.*' by its Grams .* needs about [\d.]+ MB") as err:
        build_plan(cfg, threads=1)
    assert "Raise memory_limit" in str(err.value)


def test_singular_gram_is_one_clear_error_and_leaves_nothing(family, tmp_path) -> None:
    root = tmp_path / "stores"
    root.mkdir()
    name, key = "bert-cls", "bert.encoder.layer.0.attention.self.query.weight"
    stores = []
    for s in (0, 1):
        model = tiny(name, s)
        g, tokens = naive_grams(model, examples(model, s))[key]
        g[:, 3] = g[3, :] = 0  # input feature 3 never fires in either model
        stores.append(
            write_plain_store(root / f"{s}.zarr", family[(name, s)]["dir"], name, s, grams={key: (g, tokens)})
        )
    cfg = config(tmp_path, family, name, (0, 1), (1, 1))
    raw = yaml.safe_load(cfg.read_text())
    for m, st in zip(raw["models"], stores):
        m["fisher"] = str(st)
    cfg.write_text(yaml.safe_dump(raw))
    plan = build_plan(load_merge_config(cfg))
    with pytest.raises(SingularGramSystem, match=r"Gram system of '.*query.weight' is singular \(1 input feature"):
        execute(plan, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_refused(family, tmp_path, alpha) -> None:
    with pytest.raises(FishmergeError, match=r"regmean.alpha"):
        load_merge_config(config(tmp_path, family, "bert-cls", (0, 1), (1, 1), regmean={"alpha": alpha}))


def test_store_without_grams_and_no_data_is_refused(family, tmp_path) -> None:
    from fishmerge.fisher.store import write_fisher_store

    d = family[("bert-cls", 1)]["dir"]
    v1 = write_fisher_store(
        str(tmp_path / "v1.zarr"),
        {k: np.ones(v.shape, np.float32) for k, v in load64(str(d)).items()},
        {"estimator": "x", "n_examples": 1, "model_fingerprint": cached_model_fingerprint(d), "data_fingerprint": "x"},
    )
    cfg = config(tmp_path, family, "bert-cls", (0, 1), (1, 1))
    raw = yaml.safe_load(cfg.read_text())
    raw["models"][1]["fisher"] = v1
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(FishmergeError, match=r"holds no gram statistics .* --statistics fisher,gram --store"):
        build_plan(load_merge_config(cfg))
    raw["models"][1].pop("fisher")
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(FishmergeError, match=r"needs `fisher:` \(a store holding its Grams\) or `data:`"):
        load_merge_config(cfg)


def test_gram_of_another_model_is_refused(family, tmp_path) -> None:
    cfg = config(tmp_path, family, "bert-cls", (0, 1), (1, 1))
    raw = yaml.safe_load(cfg.read_text())
    raw["models"][1]["fisher"] = str(family[("bert-cls", 2)]["grams"])  # computed for model 2
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(FishmergeError, match="computed for another model"):
        build_plan(load_merge_config(cfg))
    # a store claiming this model but holding another architecture's Grams (other widths)
    other = write_plain_store(
        tmp_path / "gpt.zarr",
        family[("bert-cls", 1)]["dir"],
        "gpt2-lm",
        0,
        model_fingerprint=cached_model_fingerprint(family[("bert-cls", 1)]["dir"]),
    )
    gmap = zarr.open_group(str(other), mode="r").attrs["grams"]
    bert_map = zarr.open_group(str(family[("bert-cls", 1)]["grams"]), mode="r").attrs["grams"]
    first = next(iter(gmap.values()))
    fake = {k: {**first, "layout": "out_in"} for k in bert_map}
    zarr.open_group(str(other), mode="a").attrs["grams"] = fake
    raw["models"][1]["fisher"] = str(other)
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(FishmergeError, match="do not fit this model's weights"):
        build_plan(load_merge_config(cfg))
    assert json.loads((Path(other) / "zarr.json").read_text())["attributes"]["format_version"] == 2


def test_tensors_the_same_for_every_target_are_merged_once_in_memory(family, tmp_path) -> None:
    seeds, weights = (0, 1, 2), (0.2, 0.5, 0.3)
    plan = build_plan(load_merge_config(config(tmp_path, family, "bert-cls", seeds, weights, store="both")))
    inputs, shared = load_inputs(plan), {}
    first = merge_in_memory(plan, inputs, plan.weights, 0, shared)
    assert set(shared) == set(plan.gram_layouts)  # rest = fisher with favor_target: the rest differs per target
    for target in (0, 1, 2):
        alone = merge_in_memory(plan, inputs, plan.weights, target)
        reused = first if target == 0 else merge_in_memory(plan, inputs, plan.weights, target, shared)
        assert all(np.array_equal(alone[k], reused[k]) for k in alone)


def test_nearly_singular_systems_are_refused_not_solved_into_garbage() -> None:
    from fishmerge.merge.methods.regmean import solve_regmean

    rng = np.random.default_rng(0)
    width = 64
    grams = []
    for _ in range(2):  # 2 × 30 rows < 64 inputs: rank 60, singular up to fp32 rounding
        x = rng.standard_normal((30, width)).astype(np.float32)
        grams.append((x.T @ x / 30).astype(np.float32).astype(np.float64))
    thetas = [rng.standard_normal((8, width)).astype(np.float32) for _ in range(2)]
    with pytest.raises(SingularGramSystem, match="too few directions"):
        solve_regmean(thetas, [0.5, 0.5], grams, "out_in", 1.0, "w")
    out = solve_regmean(thetas, [0.5, 0.5], grams, "out_in", 0.9, "w")  # the shrink makes it solvable
    assert np.isfinite(out).all() and np.abs(out).max() < 100
    assert all(np.array_equal(g, g.T) for g in grams)  # the caller's Grams are left as they were
