"""Plan a merge before doing any of it: check every input, lay out the output, estimate the cost.

`build_plan` reads only headers, configs and Fisher store attributes (plus cached model
fingerprints), reports every incompatibility at once, and fixes what the executor will do:
which tensors are merged (present with one shape in every model) and which come from each
target (its head), the output files and their layout, the block size that fits the memory
budget, and the bytes, disk, memory and time the merge will cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zarr

from fishmerge import __version__
from fishmerge.errors import FishmergeError
from fishmerge.fisher.statistics import FISHER, GRAM, LAYOUT_IN_OUT, LAYOUT_OUT_IN, STATISTICS
from fishmerge.fisher.store import held_statistics, open_fisher_store, stored_grams
from fishmerge.io import safety
from fishmerge.io.checkpoint import cached_model_fingerprint, model_architecture, read_model_config
from fishmerge.io.safetensors import DTYPE_NAMES, FLOAT_DTYPES, ITEMSIZE, TensorRef, tensor_index
from fishmerge.merge.config import MergeConfig
from fishmerge.merge.methods import MergeMethod, get_method
from fishmerge.schema import Strict
from fishmerge.sizes import parse_size

DEFAULT_SHARD_SIZE = 2 * 10**9
BASELINE_RSS = 450 * 2**20  # interpreter, numpy, torch, dask, zarr: measured RssAnon before any block
MAX_BLOCK_ELEMS = 8 * 2**20
READ_BYTES_PER_S = 400e6  # rough streaming rate on the dev machine (benchmarks/merge_throughput.py)


@dataclass
class ModelInput:
    """One model of the merge: where it is, what it is, its tensors and its Fisher."""

    name: str
    path: str
    weight: float
    fingerprint: str
    architecture: str
    model_type: str
    refs: dict[str, TensorRef]
    fisher: str | None = None
    fisher_id: str | None = None
    statistics: tuple[str, ...] = ()  # what its store holds (or will hold, once estimated)
    grams: dict[str, dict] = field(default_factory=dict)  # its store's `grams` map: weight key -> array, tokens, layout


@dataclass
class OutputFilePlan:
    """One safetensors file of one target's output: its name and tensor keys in order."""

    name: str
    keys: list[str]
    nbytes: int = 0


@dataclass
class TargetPlan:
    """One target's output directory: merged keys, its own (head) keys, dtypes, files."""

    name: str
    index: int  # position of the target in plan.models
    own_keys: list[str]
    dtypes: dict[str, str]
    files: list[OutputFilePlan] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


@dataclass
class MergePlan:
    """Everything the executor needs, decided up front."""

    plan_id: str
    method: str
    params: Strict  # the method's validated parameters (exactly those its formula reads)
    weights: list[float]
    models: list[ModelInput]
    base: ModelInput | None
    base_keys: dict[str, str]  # merged key -> key in the base checkpoint
    shared: list[str]
    targets: list[TargetPlan]
    output: str
    shard_size: int
    memory_limit: int
    threads: int
    block_elems: int
    bytes_read: int
    bytes_written: int
    peak_memory: int
    est_seconds: float
    notes: list[str] = field(default_factory=list)
    config_name: str = ""
    statistics: tuple[str, ...] = ()  # the merge statistics the method reads with these parameters
    gram_layouts: dict[str, str] = field(default_factory=dict)  # tensors merged by their Grams -> layout
    gram_rows: dict[str, int] = field(default_factory=dict)  # their rows per task (all of a Conv1D's)

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    def same_for_every_target(self, key: str) -> bool:
        """Whether merged tensor `key` is the same for every target (merged once): the method's result does
        not depend on the target, or `key` is merged in closed form from its Grams."""
        return not self.merge_method.per_target or key in self.gram_layouts

    @property
    def staging(self) -> str:
        """Where the output is built before it is renamed into place (deterministic: reruns resume)."""
        out = Path(self.output)
        return str(out.parent / f".{out.name}.staging-{self.plan_id}")


def _base_prefix(m: ModelInput) -> str:
    """The body's key prefix (e.g. `bert`), read off the keys: the first component most tensors share.

    (Importing the transformers class for `base_model_prefix` costs seconds; the keys say it.)
    """
    if m.architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return ""
    counts: dict[str, int] = {}
    for key in m.refs:
        if "." in key:
            head = key.split(".", 1)[0]
            counts[head] = counts.get(head, 0) + 1
    if not counts:
        return ""
    prefix, n = max(counts.items(), key=lambda kv: kv[1])
    return prefix if n > len(m.refs) / 2 else ""


def _is_head(key: str, architecture: str, prefix: str) -> bool:
    """Task heads (classifiers) are never merged: each target keeps its own. LM heads are merged."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")) or not prefix:
        return False
    return not key.startswith(prefix + ".")


def _open_model(name: str, path: str, weight: float, problems: list[str]) -> ModelInput | None:
    try:
        arch = model_architecture(path)
        cfg = read_model_config(path)
        refs = tensor_index(path)
        fp = cached_model_fingerprint(path)
    except FishmergeError as exc:
        problems.append(f"model '{name}': {exc}")
        return None
    return ModelInput(name, path, weight, fp, arch, cfg.get("model_type", "?"), refs)


def _open_base(path: str, problems: list[str]) -> ModelInput | None:
    """The base model may be headless (e.g. BertModel): only its tensors and fingerprint are needed."""
    try:
        refs = tensor_index(path)
        fp = cached_model_fingerprint(path)
        cfg = read_model_config(path) if (Path(path) / "config.json").exists() else {}
    except FishmergeError as exc:
        problems.append(f"base: {exc}")
        return None
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else "?"
    return ModelInput("base", path, 0.0, fp, arch, cfg.get("model_type", "?"), refs)


def _open_store(m: ModelInput, unfingerprinted_ok: bool, problems: list[str], notes: list[str]) -> zarr.Group | None:
    """The model's store, if it is a store of this very model: its id, statistics and Gram map recorded.
    A store that records no model fingerprint is refused unless `unfingerprinted_ok` (then noted as unverified)."""
    try:
        group = open_fisher_store(m.fisher)
    except FishmergeError as exc:
        problems.append(f"model '{m.name}': {exc}")
        return None
    attrs = dict(group.attrs)
    m.fisher_id = (
        attrs.get("fisher_id")
        or hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:24]
    )
    if not attrs.get("model_fingerprint"):
        if not unfingerprinted_ok:
            problems.append(
                f"model '{m.name}': the Fisher store '{m.fisher}' records no model_fingerprint, so nothing shows it was "
                f"computed for this model: add the attribute `model_fingerprint: {m.fingerprint}` (`fishmerge "
                "fingerprint MODEL_DIR` prints it; the README gives the recipe), or accept the risk with "
                "`fisher_without_fingerprint: true` on this model"
            )
            return None
        notes.append(
            f"UNVERIFIED: model '{m.name}' uses the store '{m.fisher}', which records no model fingerprint "
            "(fisher_without_fingerprint: true): nothing checks that it was computed for this model; a Fisher of "
            "another model with the same tensor names and shapes would merge silently into wrong weights"
        )
    elif attrs.get("model_fingerprint") != m.fingerprint:
        problems.append(
            f"model '{m.name}': the Fisher store '{m.fisher}' was computed for another model "
            f"(fingerprint {str(attrs.get('model_fingerprint'))[:19]}…, this model is {m.fingerprint[:19]}…): "
            "point `fisher:` at this model's store, or give `data:` to estimate it"
        )
        return None
    m.statistics = held_statistics(attrs)
    m.grams = stored_grams(group)
    return group


def _lacks(m: ModelInput, needed: tuple[str, ...], method: str, problems: list[str]) -> bool:
    """Whether the store lacks a statistic the method reads (reported with the way to add it)."""
    absent = [s for s in needed if s not in m.statistics]
    if absent:
        flags = ",".join(s for s in STATISTICS if s in {*absent, *m.statistics})
        problems.append(
            f"model '{m.name}': the store '{m.fisher}' holds no {' and no '.join(absent)} statistics "
            f"(it holds {', '.join(m.statistics)}), which method '{method}' reads: add them with `fishmerge fisher "
            f"--statistics {flags} --store {m.fisher} …` on the same data (only what is missing is computed), "
            "or give the model `data:` without `fisher:` to estimate them"
        )
    return bool(absent)


def _check_grams(m: ModelInput, group: zarr.Group, shared: list[str], problems: list[str]) -> None:
    """Each Gram must be square, as wide as its weight's input, counted over some tokens, and finite."""
    wrong, bad = [], []
    stats = group.attrs.get("gram_stats") or {}
    for key, entry in m.grams.items():
        if key not in shared:
            continue
        shape, layout = m.refs[key].shape, entry.get("layout")
        width = shape[1] if layout == LAYOUT_OUT_IN and len(shape) == 2 else shape[0] if len(shape) == 2 else None
        try:
            gshape = tuple(group[entry["array"]].shape)
        except KeyError:
            gshape = None
        if width is None or gshape != (width, width) or layout not in (LAYOUT_OUT_IN, LAYOUT_IN_OUT):
            wrong.append(f"{key} {gshape} ({layout}) vs weight {shape}")
        elif int(entry.get("tokens", 0)) <= 0:
            wrong.append(f"{key}: counted over {entry.get('tokens')} tokens")
        elif not math.isfinite(float((stats.get(entry["array"]) or {}).get("trace", 0.0))):
            bad.append(key)
    if wrong:
        problems.append(
            f"model '{m.name}': the Grams of store '{m.fisher}' do not fit this model's weights (a Gram of another "
            f"model?): {wrong[:3]}; recompute them for this model"
        )
    if bad:
        problems.append(f"model '{m.name}': the store '{m.fisher}' holds NaN/Inf Grams for {bad[:5]}: recompute them")


def _check_fisher(m: ModelInput, group: zarr.Group, shared: list[str], problems: list[str]) -> None:
    """The store's Fishers must cover the merged tensors with their shapes, and hold finite values."""
    attrs = dict(group.attrs)
    arrays = dict(group.arrays())
    missing = [k for k in shared if k not in arrays]
    wrong = [
        f"{k} {tuple(arrays[k].shape)} vs {m.refs[k].shape}"
        for k in shared
        if k in arrays and tuple(arrays[k].shape) != m.refs[k].shape
    ]
    if missing:
        problems.append(
            f"model '{m.name}': Fisher store '{m.fisher}' lacks tensors {missing[:5]}{' …' if len(missing) > 5 else ''}"
        )
    if wrong:
        problems.append(f"model '{m.name}': Fisher store '{m.fisher}' has other shapes: {wrong[:5]}")
    stats = attrs.get("tensor_stats") or {}
    bad = [
        k for k in shared if k in stats and not all(math.isfinite(float(stats[k].get(s, 0.0))) for s in ("mass", "max"))
    ]
    if bad:
        problems.append(
            f"model '{m.name}': the Fisher store '{m.fisher}' holds NaN/Inf in {bad[:5]}: recompute the Fisher "
            "(a NaN Fisher usually means NaN logits: check the model and data)"
        )


def bytes_per_element(n_models: int, n_targets: int, method: MergeMethod) -> int:
    """Working memory per merged element in one block (inputs in fp32 and raw, what the method reads
    beside them, temporaries, the encoded outputs)."""
    return n_models * (4 + 2 + method.bytes_per_model) + method.bytes_fixed + 5 * 4 + n_targets * (4 + 2)


def build_plan(
    cfg: MergeConfig,
    fishers: dict[str, str] | None = None,
    *,
    shard_size: int | str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    check_output: bool = True,
) -> MergePlan:
    """Check every input and decide the whole merge; raise one FishmergeError listing all problems.

    `fishers` maps model names to Fisher stores estimated for this merge (models with `data:`);
    stores named in the config come from `fisher:`.
    """
    problems: list[str] = []
    notes: list[str] = []
    method = get_method(cfg.method)
    models = [_open_model(m.name, m.path, m.weight, problems) for m in cfg.models]
    base = _open_base(cfg.base, problems) if cfg.base and (method.needs_base) else None
    if problems or any(m is None for m in models):
        raise _error(problems)

    types = {m.model_type for m in models}
    if len(types) > 1:
        problems.append(
            "architectures differ: " + ", ".join(f"{m.name}={m.model_type} ({m.architecture})" for m in models)
        )
        raise _error(problems)

    # Shared tensors: in every model with one shape. A head differs in shape (labels) and stays per target.
    prefixes = {m.name: _base_prefix(m) for m in models}
    common = set.intersection(*(set(m.refs) for m in models))
    shared, mismatched = [], []
    for key in sorted(common, key=lambda k: list(models[0].refs).index(k)):
        shapes = [m.refs[key].shape for m in models]
        head = any(_is_head(key, m.architecture, prefixes[m.name]) for m in models)
        if head:
            continue
        if len(set(shapes)) > 1:
            mismatched.append(f"{key}: " + ", ".join(f"{m.name} {list(m.refs[key].shape)}" for m in models))
        elif all(m.refs[key].dtype in FLOAT_DTYPES for m in models):
            shared.append(key)
    if mismatched:
        vocab = _vocab_sizes(cfg)
        hint = f" (vocabulary sizes {vocab})" if len(set(vocab.values())) > 1 else ""
        problems.append(f"{len(mismatched)} tensor(s) differ in shape{hint}:\n    " + "\n    ".join(mismatched))
    not_everywhere = sorted(set().union(*(set(m.refs) for m in models)) - common)
    body_missing = [k for k in not_everywhere if not any(_is_head(k, m.architecture, prefixes[m.name]) for m in models)]
    if body_missing:
        notes.append(
            f"{len(body_missing)} body tensor(s) are not in every model and come from each target: {body_missing[:3]}"
        )
    if not shared:
        problems.append("the models share no tensor of equal shape: nothing to merge")

    base_keys: dict[str, str] = {}
    if base is not None:
        prefix = prefixes[models[0].name]
        absent, wrong = [], []
        for key in shared:
            cand = [key, key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key]
            found = next((c for c in cand if c in base.refs), None)
            if found is None:
                absent.append(key)
            elif base.refs[found].shape != models[0].refs[key].shape:
                wrong.append(f"{key}: base {list(base.refs[found].shape)} vs models {list(models[0].refs[key].shape)}")
            else:
                base_keys[key] = found
        if absent:
            problems.append(f"the base model lacks {len(absent)} merged tensor(s): {absent[:5]}")
        if wrong:
            problems.append("the base model differs in shape:\n    " + "\n    ".join(wrong[:10]))

    params = cfg.method_params()
    needed: tuple[str, ...] = ()
    gram_layouts: dict[str, str] = {}
    if method.statistics(params):
        fishers = fishers or {}
        groups = {}
        for m, mc in zip(models, cfg.models):
            m.fisher = fishers.get(m.name) or mc.fisher
            if m.fisher is None:
                m.statistics = tuple(cfg.estimated_statistics())
                notes.append(
                    f"the {'/'.join(m.statistics)} statistics of '{m.name}' will be estimated from its data first"
                )
                continue
            groups[m.name] = _open_store(m, mc.fisher_without_fingerprint, problems, notes)
        available = [s for s in STATISTICS if all(s in m.statistics for m in models)]
        params = method.resolve_params(params, available)
        needed = method.statistics(params)
        for m in models:
            group = groups.get(m.name)
            if group is None or _lacks(m, needed, cfg.method, problems):
                continue
            if FISHER in needed:
                _check_fisher(m, group, shared, problems)
            if GRAM in needed:
                _check_grams(m, group, shared, problems)
        if GRAM in needed and all(m.name in groups for m in models):
            gram_layouts = {
                k: models[0].grams[k]["layout"]
                for k in shared
                if all(k in m.grams for m in models) and len({m.grams[k]["layout"] for m in models}) == 1
            }
            partial = [k for k in shared if k not in gram_layouts and any(k in m.grams for m in models)]
            if partial:
                notes.append(
                    f"{len(partial)} weight(s) have a Gram in some stores only, or in other layouts, and are "
                    f"merged like the tensors without Grams: {partial[:3]}"
                )

    targets: list[TargetPlan] = []
    names = [m.name for m in models]
    for t in cfg.target_names:
        i = names.index(t)
        own = [k for k in models[i].refs if k not in shared]
        dtypes = {}
        for key, ref in models[i].refs.items():
            want = DTYPE_NAMES.get(cfg.dtype)
            dtypes[key] = want if (want and ref.dtype in FLOAT_DTYPES) else ref.dtype
        targets.append(TargetPlan(t, i, own, dtypes))

    if problems:
        raise _error(problems)

    try:
        size = parse_size(shard_size) if shard_size is not None else cfg.shard_size
    except ValueError as exc:
        raise FishmergeError(f"--shard-size: {exc}") from exc
    if size <= 0:
        raise FishmergeError(f"--shard-size must be a positive size (e.g. 2GB), got {shard_size}")
    if threads is not None and threads < 1:
        raise FishmergeError(f"--threads must be ≥ 1, got {threads}")
    for tp in targets:
        tp.files = _shard_files(list(models[tp.index].refs), tp.dtypes, models[tp.index].refs, size)

    weights = [float(w) for w in method.check_weights([m.weight for m in models])]
    n_threads = max(1, threads or os.cpu_count() or 1)
    per_elem = bytes_per_element(len(models), len(targets), method)
    budget = cfg.memory_limit - BASELINE_RSS
    block = min(MAX_BLOCK_ELEMS, int(budget * 0.6) // (n_threads * per_elem)) if budget > 0 else 0
    largest_row = max((models[0].refs[k].row_elems for k in shared), default=1)
    if block < largest_row:
        need = BASELINE_RSS + int(largest_row * per_elem * n_threads / 0.6)
        raise _error(
            [
                f"memory_limit {_fmt(cfg.memory_limit)} is too small for this merge: one row of the widest tensor "
                f"needs about {_fmt(need)} with {n_threads} thread(s). Raise memory_limit or use fewer threads."
            ]
        )
    gram_peak, gram_read, gram_rows = 0, 0, {}
    usable = int(budget * 0.6) // n_threads if budget > 0 else 0  # per thread, as for blocks
    for key, layout in gram_layouts.items():
        ref = models[0].refs[key]
        width = ref.shape[1] if layout == LAYOUT_OUT_IN else ref.shape[0]
        gram_read += 4 * width * width * len(models)
        fixed, per = method.gram_cost(len(models), width)
        row_cost = ref.row_elems * (per_elem + per)
        rows = (usable - fixed) // row_cost if usable > fixed else 0
        whole = layout == LAYOUT_IN_OUT  # (Σλ G̃)⁻¹ Σλ G̃ W needs every row
        if rows < (ref.rows if whole else 1):
            need_rows = ref.rows if whole else 1
            need = BASELINE_RSS + int((fixed + need_rows * row_cost) * n_threads / 0.6)
            raise _error(
                [
                    f"memory_limit {_fmt(cfg.memory_limit)} is too small for this merge: merging '{key}' by its "
                    f"Grams ({len(models)} Grams of {width}×{width}, read one at a time, and "
                    f"{'the whole weight' if whole else 'a row of the weights'}) needs about {_fmt(need)} with "
                    f"{n_threads} thread(s). Raise memory_limit to at least that, or use fewer threads."
                ]
            )
        gram_rows[key] = min(ref.rows, rows)
        gram_peak = max(gram_peak, fixed + gram_rows[key] * row_cost)
    shared_elems = sum(math.prod(models[0].refs[k].shape) for k in shared)
    read = sum(m.refs[k].nbytes for m in models for k in shared) + gram_read
    if FISHER in needed:
        read += 4 * shared_elems * len(models)
    if base is not None:
        read += sum(base.refs[base_keys[k]].nbytes for k in shared)
    read += sum(models[tp.index].refs[k].nbytes for tp in targets for k in tp.own_keys)
    written = sum(tp.nbytes for tp in targets)
    peak = BASELINE_RSS + n_threads * max(
        gram_peak, min(block, max((math.prod(models[0].refs[k].shape) for k in shared), default=1)) * per_elem
    )
    passes = 1 + sum(p.passes for p in method.prepasses(params))
    est = (read * passes + written) / READ_BYTES_PER_S

    plan = MergePlan(
        plan_id="",
        method=cfg.method,
        params=params,
        weights=weights,
        models=models,
        base=base,
        base_keys=base_keys,
        shared=shared,
        targets=targets,
        output=cfg.output,
        shard_size=size,
        memory_limit=cfg.memory_limit,
        threads=n_threads,
        block_elems=block,
        bytes_read=read,
        bytes_written=written,
        peak_memory=peak,
        est_seconds=est,
        notes=notes,
        config_name=cfg.name,
        statistics=needed,
        gram_layouts=gram_layouts,
        gram_rows=gram_rows,
    )
    plan.plan_id = plan_identity(plan, cfg.dtype)
    if check_output:
        check_output_path(plan, overwrite, input_paths(cfg, plan))
    return plan


def input_paths(cfg: MergeConfig, plan: MergePlan) -> list[tuple[str, str | None]]:
    """(what, path) of every input of a merge: models, base, Fisher stores (named in the config or
    estimated for it), data — never written over."""
    out: list[tuple[str, str | None]] = [("base model", cfg.base)]
    for m in cfg.models:
        out += [(f"input model '{m.name}'", m.path), (f"Fisher store of '{m.name}'", m.fisher)]
        if m.data:
            out.append((f"data of '{m.name}'", m.data.path))
    for m in plan.models:
        out.append((f"Fisher store of '{m.name}'", m.fisher))
    return out


def plan_for(
    cfg: MergeConfig,
    fishers: dict[str, str] | None = None,
    *,
    weights: dict[str, float] | list[float] | None = None,
    method: str | None = None,
    **options,
) -> MergePlan:
    """Plan a validated config, optionally with other λ (a search candidate) or another method (a
    baseline); the config itself is left as it is."""
    cfg = cfg.model_copy(deep=True)
    if method:
        cfg.method = method
    if isinstance(weights, dict):
        for m in cfg.models:
            m.weight = float(weights.get(m.name, m.weight))
    elif weights is not None:
        for m, w in zip(cfg.models, weights):
            m.weight = float(w)
    return build_plan(cfg, fishers, **options)


def plan_from_config(config: str, fishers: dict[str, str] | None = None, **options) -> MergePlan:
    """Load and validate a config file, then plan it (`plan_for`)."""
    from fishmerge.merge.config import load_merge_config

    return plan_for(load_merge_config(config), fishers, **options)


def plan_identity(plan: MergePlan, dtype: str) -> str:
    """Hash of what determines the output bytes (inputs by content, method, options, λ, layout)."""
    key = {
        "version": __version__,
        "method": plan.method,
        "params": plan.params.model_dump(mode="json"),
        "weights": plan.weights,
        "models": [[m.name, m.fingerprint, m.fisher_id] for m in plan.models],
        "base": plan.base.fingerprint if plan.base else None,
        "targets": [t.name for t in plan.targets],
        "dtype": dtype,
        "shard_size": plan.shard_size,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def identical_output_exists(plan: MergePlan) -> bool:
    """The output folder holds exactly this plan's result already (same inputs, method, options, λ)."""
    out = Path(plan.output)
    for t in plan.targets:
        try:
            record = json.loads((out / t.name / "fishmerge.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if record.get("plan_id") != plan.plan_id:
            return False
    return True


OUTPUT_MARKER = "fishmerge-output.json"  # at the root of every output folder fishmerge writes
REPORT_FILES = ("report.md", "pipeline.json", "lambda_curve.png", "tasks.png")  # the pipeline's, beside targets


def replaceable_output(path: str | Path) -> bool:
    """A merge output fishmerge wrote, or an empty folder (nothing to lose)."""
    return is_fishmerge_output(path) or safety.is_empty_dir(path)


def is_fishmerge_output(path: str | Path) -> bool:
    """The folder is a merge output fishmerge wrote (its marker; or, from before the marker, nothing but
    target folders with fishmerge.json and the pipeline's report files): the only folder --overwrite replaces."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    if (p / OUTPUT_MARKER).is_file():
        return True
    entries = list(p.iterdir())
    targets = [e for e in entries if e.is_dir() and (e / "fishmerge.json").is_file()]
    reports = [e for e in entries if e.is_file() and (e.name in REPORT_FILES or e.name.startswith("fisher_mass_"))]
    return bool(targets) and len(targets) + len(reports) == len(entries)


def check_output_path(plan: MergePlan, overwrite: bool, inputs: list[tuple[str, str | None]] = ()) -> None:
    """The output must not be or touch an input, must not exist unless it is a fishmerge output to
    replace (--overwrite) or this very merge, must be writable, and its disk must hold it."""
    out = Path(plan.output)
    safety.check_not_input(out, inputs, "the output", "choose an `output:` outside every input")
    if identical_output_exists(plan):
        return
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FishmergeError(f"the output '{out}' exists and is not a folder: choose another `output:`")
    holds_files = out.is_dir() and any(out.iterdir())  # an empty folder holds nothing to lose: it is used
    if holds_files and not is_fishmerge_output(out):
        raise FishmergeError(
            f"the output '{out}' exists and is not a fishmerge output (no {OUTPUT_MARKER}): fishmerge never "
            "replaces it; choose another `output:` (a new folder)"
        )
    if holds_files and not overwrite:
        raise FishmergeError(
            f"the output '{out}' already holds another fishmerge merge: choose another `output:`, or pass "
            "--overwrite to replace it"
        )
    parent = safety.existing_ancestor(out.parent)
    try:
        safety.probe_writable(parent)
    except OSError as exc:
        raise FishmergeError(
            f"cannot write the output under '{parent}' ({exc.strerror or exc}): choose a writable `output:`"
        ) from exc
    staged = _staged_bytes(plan)
    free = shutil.disk_usage(parent).free
    need = plan.bytes_written - staged
    if need > free:
        raise FishmergeError(
            f"not enough disk for the output: {_fmt(need)} to write under '{parent}', {_fmt(free)} free. "
            "Free space or choose another `output:`"
        )


def _staged_bytes(plan: MergePlan) -> int:
    """Bytes already allocated by an interrupted run of the same plan (they are reused)."""
    staging = Path(plan.staging)
    return sum(f.stat().st_size for f in staging.rglob("*.safetensors")) if staging.exists() else 0


def _shard_files(
    keys: list[str], dtypes: dict[str, str], refs: dict[str, TensorRef], shard_size: int
) -> list[OutputFilePlan]:
    files: list[OutputFilePlan] = [OutputFilePlan("", [])]
    for key in keys:
        n = math.prod(refs[key].shape) * ITEMSIZE[dtypes[key]]
        if files[-1].keys and files[-1].nbytes + n > shard_size:
            files.append(OutputFilePlan("", []))
        files[-1].keys.append(key)
        files[-1].nbytes += n
    total = len(files)
    for i, f in enumerate(files):
        f.name = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
    return files


def _vocab_sizes(cfg: MergeConfig) -> dict[str, object]:
    out = {}
    for m in cfg.models:
        try:
            c = read_model_config(m.path)
            text = c.get("text_config")
            out[m.name] = c.get("vocab_size") or (text.get("vocab_size") if isinstance(text, dict) else None)
        except FishmergeError:
            out[m.name] = None
    return out


def _error(problems: list[str]) -> FishmergeError:
    if len(problems) == 1:
        return FishmergeError(problems[0])
    return FishmergeError(f"{len(problems)} problems with the merge inputs:\n  " + "\n  ".join(problems))


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n}"


def format_plan(plan: MergePlan) -> str:
    """The plan as people read it: inputs, what is merged, what each target keeps, the cost."""
    shared_bytes = sum(plan.models[0].refs[k].nbytes for k in plan.shared)
    lines = [
        f"merge plan {plan.plan_id}  ({plan.config_name}, method {plan.method})",
        "inputs:",
    ]
    for m, w in zip(plan.models, plan.weights):
        fisher = f", fisher {m.fisher}" if m.fisher else ""
        lines.append(f"  {m.name:<16} λ={w:.4g}  {m.architecture}  {m.path}  ({m.fingerprint[:19]}…){fisher}")
    if plan.base:
        lines.append(f"  base             {plan.base.path}  ({plan.base.fingerprint[:19]}…)")
    lines.append(f"options: {plan.merge_method.describe(plan.params)}")
    lines.append(f"merged tensors: {len(plan.shared)} ({_fmt(shared_bytes)} per model)")
    if plan.gram_layouts:
        tasks = sum(-(-plan.models[0].refs[k].rows // plan.gram_rows[k]) for k in plan.gram_layouts)
        lines.append(
            f"  by their Grams: {len(plan.gram_layouts)} weight(s) in {tasks} task(s) (one Gram in memory at "
            f"a time); the other {len(plan.shared) - len(plan.gram_layouts)} as the options say"
        )
    for t in plan.targets:
        own = ", ".join(t.own_keys[:4]) + (" …" if len(t.own_keys) > 4 else "")
        lines.append(
            f"target {t.name}: {len(t.own_keys)} own tensor(s) [{own}] -> {plan.output}/{t.name}/ "
            f"({len(t.files)} file(s), {_fmt(t.nbytes)})"
        )
    lines += [
        f"read: {_fmt(plan.bytes_read)}   write: {_fmt(plan.bytes_written)}   disk needed: {_fmt(plan.bytes_written)}",
        f"memory: limit {_fmt(plan.memory_limit)}, estimated peak {_fmt(plan.peak_memory)} "
        f"({plan.threads} thread(s) × blocks of {plan.block_elems:,} elements)",
        f"time: about {plan.est_seconds:.0f} s (at ~{READ_BYTES_PER_S / 1e6:.0f} MB/s)",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
