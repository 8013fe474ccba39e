"""Fisher estimation as resumable, content-addressed steps (no Prefect here: flows wire them up).

resolve()        the spec → Fisher id and store location, from fingerprints only (no model load)
existing_store() the finished store for this id, if any (reuse: computed once, used by every merge)
compute_shard()  one shard: load the model, accumulate its examples, write its partial
finish()         reduce the complete partials into the v1 store, drop the partials
The flow `flows/estimate_fisher.py` runs them; a library user can call them in a loop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from pydantic import ValidationError
from tqdm.auto import tqdm

from fishmerge.errors import FishmergeError
from fishmerge.fisher.engine import FisherAccumulator
from fishmerge.fisher.estimators import detect_head, estimator_for, get_estimator
from fishmerge.fisher.options import FisherOptions
from fishmerge.fisher.reduce import CorruptPartials, reduce_partials
from fishmerge.fisher.shards import (
    PartialGram,
    Shard,
    complete_shards,
    discard_shard,
    partials_uri,
    write_partial,
)
from fishmerge.fisher.statistics import FISHER, GRAM, STATISTICS, check_statistics
from fishmerge.fisher.store import (
    FORMAT,
    WRITING,
    check_store_path,
    held_statistics,
    is_finished,
    open_fisher_store,
    stored_attributes,
)
from fishmerge.io import safety, storage
from fishmerge.io.checkpoint import (
    cached_model_fingerprint,
    checkpoint_keys,
    checkpoint_names,
    clamp_length,
    load_model,
    model_architecture,
    read_model_config,
    tokenizer_fingerprint,
)
from fishmerge.io.data import (
    check_columns,
    data_fingerprint,
    encode,
    lm_fields,
    lm_format,
    load_split,
    select_indices,
)

DEFAULT_STORE_ROOT = "./.fishmerge/fishers"
ID_FORMAT_VERSION = 1  # part of every Fisher id: v2 stores (Grams) are named by their statistics instead


def _option(name: str):
    """The default of a Fisher option, from its one definition (`fishmerge.fisher.options.FisherOptions`)."""
    return FisherOptions.model_fields[name].get_default(call_default_factory=True)


@dataclass
class FisherSpec:
    """Everything that determines a Fisher, plus how to compute it (device, dtype, batch, memory).

    The option fields (estimator … fallback) are `FisherOptions`' fields with its defaults; `examples`
    may also be None (every row). `check_spec` validates them through `FisherOptions`."""

    model: str
    data: str
    split: str = "train"
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    label_field: str | None = "label"
    estimator: str = _option("estimator")
    examples: int | None = _option("examples")
    seed: int = _option("seed")
    batch_size: int = _option("batch_size")
    max_length: int = _option("max_length")
    device: str = "auto"
    dtype: str = _option("dtype")
    max_memory: int = _option("max_memory")
    fallback: str = _option("fallback")
    messages_field: str | None = None  # causal LMs: a chat-style messages column (the last turn is the response)
    statistics: list[str] = field(default_factory=lambda: _option("statistics"))  # fisher and/or gram


@dataclass
class Resolved:
    """A spec pinned to content: fingerprints, Fisher id, selected rows, store location."""

    spec: FisherSpec
    fisher_id: str
    model_fingerprint: str
    data_fingerprint: str
    head: str
    label_field: str | None
    indices: list[int]
    store: str
    estimation_id: str = ""  # the id of the same estimation with the Fisher only: names every store of it
    donor: str | None = None  # a finished store of this estimation holding some of the statistics asked for
    compute: list[str] = field(default_factory=list)  # the statistics this run computes (not in the donor)
    siblings: dict[str, str] = field(default_factory=dict)  # "fisher,gram" -> where that store of it would be

    @property
    def partials(self) -> str:
        return partials_uri(self.store)

    @property
    def to_compute(self) -> list[str]:
        """The statistics this run computes: those asked for that the donor store lacks."""
        return list(self.compute or self.spec.statistics)

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": asdict(self.spec)}

    @classmethod
    def from_dict(cls, d: dict) -> Resolved:
        return cls(**{**d, "spec": FisherSpec(**d["spec"])})


def fisher_id(
    model_fp: str,
    data_fp: str,
    spec: FisherSpec,
    n: int,
    label_field: str | None,
    lm_format: str | None = None,
    tokenizer_fp: str | None = None,
) -> str:
    """Content address of a Fisher: what it was computed from and how, never where or on what device.
    (`lm_format` only for causal LMs on prompt/response or chat data, and `statistics` only when they
    are not the Fisher alone, so other ids stay as they were.)"""
    statistics = list(check_statistics(spec.statistics))
    key = {
        "model": model_fp,
        "data": data_fp,
        "estimator": spec.estimator,
        "n": n,
        "seed": spec.seed,
        "max_length": spec.max_length,
        "text_fields": list(spec.text_fields),
        "label_field": label_field,
        "format_version": ID_FORMAT_VERSION,
        **({"statistics": statistics} if statistics != [FISHER] else {}),
        **(
            {"lm_format": lm_format, "messages_field": spec.messages_field, "tokenizer": tokenizer_fp}
            if lm_format
            else {}
        ),
    }
    return "f" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def check_spec(spec: FisherSpec) -> FisherSpec:
    """The options a Fisher is computed with, validated by `FisherOptions`: refused up front, in one
    line naming the flag to fix (`--batch-size must be ≥ 1, got 0`). Returns the spec with sizes
    such as '256MB' as bytes."""
    values = {name: getattr(spec, name) for name in FisherOptions.model_fields}
    if values["examples"] is None:  # every row
        del values["examples"]
    try:
        checked = FisherOptions.model_validate(values, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + str(error["loc"][0] if error["loc"] else "options").replace("_", "-")
        message = error["msg"]
        if message.startswith("Value error, "):  # fishmerge's own checks say what they got
            message = message.removeprefix("Value error, ")
            raise FishmergeError(f"{flag} {message}" if message.startswith("must") else f"{flag}: {message}") from None
        raise FishmergeError(f"{flag}: {message[:1].lower()}{message[1:]}, got {error['input']!r}") from None
    return replace(spec, **{name: getattr(checked, name) for name in values})


def resolve(spec: FisherSpec, store: str | None = None, store_root: str = DEFAULT_STORE_ROOT) -> Resolved:
    """Fingerprint the inputs and name the store, without loading model weights."""
    spec = check_spec(spec)
    dataset = load_split(spec.data, spec.split)
    indices = select_indices(len(dataset), spec.examples, spec.seed)
    arch = model_architecture(spec.model)
    head = detect_head(arch)
    if spec.estimator != estimator_for(spec.estimator, head):  # `auto` names the Fisher by what it stands for
        spec = replace(spec, estimator=estimator_for(spec.estimator, head))
    lm_fields(head, spec.text_fields, spec.messages_field)
    length = clamp_length(spec.max_length, read_model_config(spec.model), "Fisher", spec.model)
    if length != spec.max_length:
        spec = replace(spec, max_length=length)  # the length actually used names the Fisher
    label_field = spec.label_field
    needs_labels = get_estimator(spec.estimator).uses_labels and head != "causal_lm"  # an LM predicts its tokens
    if head == "causal_lm" or (label_field and label_field not in dataset.column_names and not needs_labels):
        label_field = None  # the default 'label' is only needed by estimators that use labels
    if needs_labels and not label_field:
        raise FishmergeError(f"the '{spec.estimator}' estimator needs --label-field")
    text = [spec.messages_field] if spec.messages_field else list(spec.text_fields)
    fields = [*text, *([label_field] if label_field else [])]
    check_columns(dataset.column_names, fields, "text/label")
    data_fp = data_fingerprint(dataset, indices, fields)
    model_fp = cached_model_fingerprint(spec.model)
    layout = lm_format(head, spec.text_fields, spec.messages_field)  # pairs/chat: the tokenizer decides the mask
    tok_fp = tokenizer_fingerprint(spec.model) if layout else None
    fid = fisher_id(model_fp, data_fp, spec, len(indices), label_field, layout, tok_fp)
    estimation = fisher_id(
        model_fp, data_fp, replace(spec, statistics=[FISHER]), len(indices), label_field, layout, tok_fp
    )
    root = storage.normalize(store_root)
    uri = storage.normalize(store) if store else storage.join(root, f"{fid}.zarr")
    if not storage.is_remote(uri):
        for target in (uri, partials_uri(uri)):
            safety.check_not_input(
                target,
                [("model folder", spec.model), ("data", spec.data)],
                "the Fisher store",
                "choose a --store (or --store-root) outside the model and data folders",
            )
    if store:
        check_store_path(uri)
    if store:  # an explicit store of this estimation keeps what it holds: the request is widened to it
        held = stored_attributes(uri)
        if (held.get("estimation_id") or held.get("fisher_id")) == estimation and is_finished(held):
            wider = [s for s in STATISTICS if s in {*spec.statistics, *held_statistics(held)}]
            if wider != list(spec.statistics):
                spec = replace(spec, statistics=wider)
                fid = fisher_id(model_fp, data_fp, spec, len(indices), label_field, layout, tok_fp)
    r = Resolved(spec, fid, model_fp, data_fp, head, label_field, indices, uri, estimation)
    if not store:  # content-addressed: the same estimation's stores with other statistics are looked at too
        for size in range(1, len(STATISTICS) + 1):
            for combo in itertools.combinations(STATISTICS, size):
                if list(combo) != list(spec.statistics):
                    other = fisher_id(
                        model_fp,
                        data_fp,
                        replace(spec, statistics=list(combo)),
                        len(indices),
                        label_field,
                        layout,
                        tok_fp,
                    )
                    r.siblings[",".join(combo)] = storage.join(root, f"{other}.zarr")
    r.donor = _donor(r, [uri, *r.siblings.values()])
    held = held_statistics(stored_attributes(r.donor)) if r.donor else ()
    r.compute = [s for s in spec.statistics if s not in held]
    return r


def _same_estimation(r: Resolved, attrs: dict) -> bool:
    """A finished store of this very estimation (same model, data, examples, options), whatever it holds."""
    return is_finished(attrs) and (attrs.get("estimation_id") or attrs.get("fisher_id")) == r.estimation_id


def _donor(r: Resolved, candidates: list[str]) -> str | None:
    """The finished store of this estimation sharing the most statistics with those asked for, but not
    all of them (a store holding them all is reused as it is): its arrays are copied, the rest computed."""
    best, most = None, 0
    for uri in candidates:
        attrs = stored_attributes(uri)
        if not _same_estimation(r, attrs):
            continue
        shared = len(set(held_statistics(attrs)) & set(r.spec.statistics))
        if most < shared < len(r.spec.statistics):
            best, most = uri, shared
    return best


def existing_store(r: Resolved, keep_partials: bool = False) -> str | None:
    """The finished store for this Fisher id (or one of the same estimation holding more statistics than
    asked for), or None. A store of another Fisher at an explicit --store is an error; one of the same
    estimation holding fewer statistics is None (its arrays are copied, the rest computed, and it is replaced).

    A store fishmerge was writing when it was killed (a remote store is copied into place from its
    staging prefix, marked `writing` until its group metadata is copied last) is not finished: None,
    and the next write replaces it."""
    if not storage.exists(storage.join(r.store, "zarr.json")):
        return _superset_sibling(r)
    stored = stored_attributes(r.store)
    if stored.get("format") == FORMAT and stored.get("format_state") == WRITING:
        return None
    try:
        attrs = dict(open_fisher_store(r.store).attrs)
    except FishmergeError:
        if r.store.endswith(f"{r.fisher_id}.zarr"):
            return None  # a torn content-addressed store: recompute it
        raise
    if attrs.get("fisher_id") == r.fisher_id or _holds_all(r, attrs):
        if not storage.is_remote(r.store):
            safety.drop_lock_file(r.store)  # left inside the store by a kill right after its rename
        # partials left when a run was killed between the commit and their removal (unless kept on purpose)
        kept = keep_partials or storage.exists(storage.join(r.partials, KEEP_MARKER))
        if storage.exists(r.partials) and not kept:
            _drop_partials(r, keep=False)
        return r.store
    if _same_estimation(r, attrs):
        return None  # holds some of the statistics: the others are computed and the store completed
    if attrs.get("model_fingerprint") != r.model_fingerprint:
        raise FishmergeError(
            f"the store '{r.store}' holds a Fisher of another model (fingerprint {attrs.get('model_fingerprint')}, "
            f"this model is {r.model_fingerprint}): choose another --store, or delete it to recompute"
        )
    raise FishmergeError(
        f"the store '{r.store}' holds another Fisher (id {attrs.get('fisher_id')}, asked for {r.fisher_id}: "
        "different data, estimator, N, seed or length): choose another --store, or delete it to recompute"
    )


def _holds_all(r: Resolved, attrs: dict) -> bool:
    return _same_estimation(r, attrs) and set(r.spec.statistics) <= set(held_statistics(attrs))


def _superset_sibling(r: Resolved) -> str | None:
    """A content-addressed store of the same estimation holding every statistic asked for and more."""
    for uri in r.siblings.values():  # none for an explicit --store: the only place looked at
        if _holds_all(r, stored_attributes(uri)):
            return uri
    return None


def compute_shard(r: Resolved, shard: Shard, progress: bool = False) -> dict:
    """Estimate one shard's Σₙ gₙ² and write its partial; returns a summary for logs and artifacts."""
    spec = r.spec
    started = time.perf_counter()
    dataset = load_split(spec.data, spec.split)
    model, tokenizer = _cached_model(spec, r.model_fingerprint)
    if getattr(model.config, "pad_token_id", None) is None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    regression = r.head == "sequence_classification" and model.config.num_labels == 1
    encoded = encode(
        dataset,
        r.indices[shard.start : shard.stop],
        tokenizer,
        text_fields=spec.text_fields,
        label_field=r.label_field,
        max_length=spec.max_length,
        label2id=getattr(model.config, "label2id", None),
        regression=regression,
        head=r.head,
        messages_field=spec.messages_field,
    )
    names = checkpoint_names(model, checkpoint_keys(spec.model))
    device = next(model.parameters()).device
    compute = r.to_compute
    t0 = time.perf_counter()
    with FisherAccumulator(
        model,
        spec.estimator,
        head=r.head,
        seed=spec.seed,
        max_memory=spec.max_memory,
        fallback=spec.fallback,
        verify=shard.index == 0,  # the model-structure check needs one batch per Fisher, not per shard
        statistics=compute,
    ) as acc:
        bar = tqdm(
            total=len(encoded),
            unit="ex",
            desc=f"fisher[{spec.estimator}] {shard.name}",
            disable=not progress,
            mininterval=1.0,
        )
        for batch, ids in encoded.batches(spec.batch_size, device):
            acc.add_batch(batch, ids)
            bar.update(len(ids))
        bar.close()
        sums = {names[k]: v.cpu().numpy() for k, v in acc.sums.items()} if FISHER in compute else {}
        grams = partial_grams(acc.grams(), names) if GRAM in compute else {}
        fallback = acc.fallback_modules
    compute_s = time.perf_counter() - t0
    write_partial(r.partials, shard, r.fisher_id, sums, len(encoded), grams, compute)
    return {
        "shard": shard.index,
        "n_examples": len(encoded),
        "compute_s": round(compute_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "device": str(device),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "padded_length": int(encoded.input_ids.shape[1]),
        "fallback_modules": fallback,
    }


def partial_grams(grams: dict, names: dict[str, str]) -> dict[str, PartialGram]:
    """The accumulator's Grams keyed to checkpoint keys (their first weight's), for a shard partial."""
    out = {}
    for g in grams.values():
        keys = [names[w] for w in g.weights]
        out[keys[0]] = PartialGram(g.sum.numpy(), g.tokens, {names[w]: g.layouts[w] for w in g.weights})
    return out


_loaded = threading.local()


def _cached_model(spec: FisherSpec, fingerprint: str):
    """The model of the previous shard computed by this thread, if it is the same one (saves a load)."""
    key = (spec.model, fingerprint, spec.device, spec.dtype)
    if getattr(_loaded, "key", None) != key:
        _loaded.key, _loaded.value = None, None  # free the old copy before loading the new one
        _loaded.value = load_model(spec.model, spec.device, spec.dtype)
        _loaded.key = key
    return _loaded.value


def missing_shards(r: Resolved, plan: list[Shard]) -> list[Shard]:
    done = complete_shards(r.partials, r.fisher_id, plan, r.to_compute)
    return [s for s in plan if s.index not in done]


def finish(r: Resolved, plan: list[Shard], summaries: list[dict], wall_s: float, keep_partials: bool = False) -> str:
    """Reduce complete partials into the store. Corrupt partials (failed checksums, missing data) are
    discarded and reported as CorruptPartials, to recompute; any other error propagates as it is."""
    done = existing_store(r, keep_partials)  # a concurrent run of the same spec may have finished first
    if done:
        _drop_partials(r, keep_partials)
        return done
    markers = complete_shards(r.partials, r.fisher_id, plan, r.to_compute)
    missing = [s.index for s in plan if s.index not in markers]
    if missing:
        raise FishmergeError(f"shards {missing} of {r.fisher_id} are not complete: rerun to compute them")
    first = summaries[0] if summaries else {}
    from_donor = tuple(s for s in r.spec.statistics if s not in r.to_compute)
    attrs = {
        "fisher_id": r.fisher_id,
        "estimation_id": r.estimation_id,
        "statistics": list(r.spec.statistics),
        "statistics_computed_last_run": list(r.to_compute),
        **({"statistics_copied_from": r.donor} if from_donor else {}),
        "estimator": r.spec.estimator,
        "model_fingerprint": r.model_fingerprint,
        "data_fingerprint": r.data_fingerprint,
        "head": r.head,
        "spec": {**asdict(r.spec), "label_field": r.label_field},
        "shards": len(plan),
        "shards_computed_last_run": sorted(s["shard"] for s in summaries),
        "device": first.get("device"),
        "model_dtype": first.get("model_dtype"),
        "fallback_modules": first.get("fallback_modules", []),
        "wall_time_s": round(wall_s, 3),
        "examples_per_s": round(len(r.indices) / wall_s, 3) if wall_s > 0 else None,
    }
    try:
        uri = reduce_partials(r.partials, plan, markers, r.store, attrs, donor=r.donor, from_donor=from_donor)
    except CorruptPartials as exc:
        # damaged or missing partial data; or not corrupt: a concurrent run finished first and took them
        done = existing_store(r, keep_partials)
        if done:
            return done
        for i in exc.shards:
            discard_shard(r.partials, plan[i])
        raise
    _drop_partials(r, keep_partials)
    return uri


KEEP_MARKER = "kept.json"


def _drop_partials(r: Resolved, keep: bool) -> None:
    """Best effort: a concurrent run may be removing or writing them at the same moment."""
    if keep:
        storage.write_json(storage.join(r.partials, KEEP_MARKER), {"fisher_id": r.fisher_id})
        return
    try:
        names = storage.listdir(r.partials)
        if all(n.startswith("shard-") or n == KEEP_MARKER for n in names):  # only what fishmerge writes there
            storage.remove(r.partials)
    except (OSError, FishmergeError):
        pass
