"""The pipeline's λ search and evaluation, cached by content: merged models against the baselines,
on each target's own task.

Merged outputs and baselines are evaluated (and cached) apart: the baselines read no Fisher, so
every Fisher variant of a merge shares them. Baselines: `originals` (each fine-tuned target model
alone), `isotropic` (plain λ-weighted average, with its own λ search), `ensemble` (output
ensembling: the average of the class probabilities that every model's body gives under the
target's head, or of causal LMs' next-token distributions; equal weights). Metric keys are
`<task>/<metric>`, e.g. `rte/accuracy`, `reviews/nll`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from fishmerge import __version__
from fishmerge.errors import FishmergeError
from fishmerge.io import storage
from fishmerge.merge.config import MergeConfig
from fishmerge.merge.methods import get_method
from fishmerge.merge.plan import MergePlan, plan_for
from fishmerge.pipeline.metrics import DEFAULTS as DEFAULT_METRICS
from fishmerge.pipeline.metrics import check_applies, get_metric, key_name, task_kind
from fishmerge.pipeline.search import MergeInputs, Scorer, candidates, load_inputs, load_state, merge_in_memory, search

CACHE_ROOT = "./.fishmerge/cache"
ISOTROPIC = "isotropic"  # the baseline's name in `evaluate.baselines` and in the pipeline's searches
BASELINE_METHOD = "isotropic"  # the merge method of the isotropic baseline (the one place it is named)


def isotropic_plan(plan: MergePlan) -> MergePlan:
    """The same merge with plain averaging (the isotropic baseline; it reads no base model)."""
    method = get_method(BASELINE_METHOD)
    return dataclasses.replace(plan, method=method.name, params=method.Params(), base=None, base_keys={})


def baseline_is_the_merge(cfg: MergeConfig) -> bool:
    """The merge itself is the isotropic baseline's method: the baseline would repeat it."""
    return cfg.method == BASELINE_METHOD


def needs_baseline_search(cfg: MergeConfig) -> bool:
    """The isotropic baseline is evaluated with λ of its own search (a search, the baseline asked for,
    and a merge method other than the baseline's)."""
    return bool(cfg.search and cfg.evaluate and ISOTROPIC in cfg.evaluate.baselines) and not baseline_is_the_merge(cfg)


def baseline_weights(cfg: MergeConfig) -> list[float] | None:
    """λ of the isotropic baseline without a search of its own: the config's, as the baseline's method
    uses them; None when the merge is itself isotropic (nothing to compare)."""
    if baseline_is_the_merge(cfg):
        return None
    return [float(w) for w in get_method(BASELINE_METHOD).check_weights([m.weight for m in cfg.models])]


def _record(out: dict[str, dict[str, float]], kind: str, target: str, values: dict[str, float]) -> None:
    for k, v in values.items():
        out.setdefault(kind, {})[f"{target}/{k}"] = v


def _device_of(scorer: Scorer, target: str) -> str:
    return str(next(scorer.models[target].parameters()).device)


def evaluate_merged(scorer: Scorer, merged_dirs: dict[str, str], metrics: list[str]) -> dict[str, dict[str, float]]:
    """{'merged': {'<task>/<metric>': value}}: each merged output folder on its target's task."""
    from fishmerge.io.checkpoint import load_model

    out: dict[str, dict[str, float]] = {"merged": {}}
    for t in scorer.plan.targets:
        merged, _ = load_model(merged_dirs[t.name], device=_device_of(scorer, t.name))
        _record(out, "merged", t.name, scorer.score(t.name, metrics, merged))
        del merged
    return out


def evaluate_baselines(
    scorer: Scorer,
    inputs: MergeInputs,
    isotropic_weights: list[float] | None,
    metrics: list[str],
    baselines: list[str],
) -> dict[str, dict[str, float]]:
    """{'originals'|'isotropic'|'ensemble': {'<task>/<metric>': value}}; none of them reads a Fisher.
    The ensemble is scored by the built-in metrics only (a user scorer is called with one model)."""
    from fishmerge.io.checkpoint import load_model

    plan = scorer.plan
    out: dict[str, dict[str, float]] = {b: {} for b in baselines}
    for t in plan.targets:
        if "originals" in baselines:
            original, _ = load_model(plan.models[t.index].path, device=_device_of(scorer, t.name))
            _record(out, "originals", t.name, scorer.score(t.name, metrics, original))
            del original
        if ISOTROPIC in baselines and isotropic_weights is not None:
            load_state(scorer.models[t.name], merge_in_memory(isotropic_plan(plan), inputs, isotropic_weights, t.index))
            _record(out, ISOTROPIC, t.name, scorer.score(t.name, metrics))
        if "ensemble" in baselines:
            outputs = []
            for theta in inputs.thetas:  # every model's body under this target's head (an LM: every model)
                load_state(scorer.models[t.name], theta)
                outputs.append(scorer.outputs(t.name))
            _record(out, "ensemble", t.name, scorer.ensemble(t.name, outputs, metrics))
    return out


def task_kinds(cfg: MergeConfig) -> dict[str, str]:
    """Each target's metric family (classification or causal_lm), from its config.json (no weights read)."""
    from fishmerge.fisher.estimators import detect_head
    from fishmerge.io.checkpoint import model_architecture

    paths = {m.name: m.path for m in cfg.models}
    return {t: task_kind(detect_head(model_architecture(paths[t]))) for t in cfg.target_names}


def settle_metrics(cfg: MergeConfig) -> MergeConfig:
    """Fill the search and evaluation metrics left to their defaults by the targets' kind (classifiers:
    accuracy, f1; causal LMs: nll, perplexity), and refuse, before any work, a metric that does not fit a
    target (perplexity of a classifier, accuracy of an LM), a user scorer that cannot be imported or
    declares no direction, and a promotion metric that is not evaluated. Idempotent."""
    kinds = task_kinds(cfg)
    family = set(kinds.values())
    if len(family) > 1 and ((cfg.search and not cfg.search.metric) or (cfg.evaluate and not cfg.evaluate.metrics)):
        raise FishmergeError(
            f"the targets mix classifiers and causal LMs ({kinds}): name search.metric and evaluate.metrics "
            "(scorers of your own, module:function, that score both)"
        )
    defaults = DEFAULT_METRICS[next(iter(family))] if family else []
    if cfg.search and not cfg.search.metric:
        cfg.search.metric = defaults[0]
    if cfg.evaluate and not cfg.evaluate.metrics:
        cfg.evaluate.metrics = list(defaults)
    named = [("search.metric", cfg.search.metric)] if cfg.search else []
    named += [("evaluate.metrics", m) for m in (cfg.evaluate.metrics if cfg.evaluate else [])]
    for where, spec in named:
        metric = get_metric(spec)
        for target, kind in kinds.items():
            check_applies(metric, kind, target, where)
    promote = cfg.register.promote if cfg.register else None
    if promote:
        promote.metric = key_name(promote.metric)
        promote.guard = {key_name(k): v for k, v in promote.guard.items()}
        evaluated = {key_name(m) for m in (cfg.evaluate.metrics if cfg.evaluate else [])}
        for key in [promote.metric, *promote.guard]:
            if key.rsplit("/", 1)[-1] not in evaluated:
                raise FishmergeError(
                    f"register.promote names '{key}', but the pipeline evaluates {sorted(evaluated) or 'nothing'}: "
                    "add the metric to evaluate.metrics (keys are <task>/<metric>)"
                )
    return cfg


def check_task_data(cfg: MergeConfig) -> None:
    """Every split the pipeline reads has the columns its model needs (a causal LM's prompt/response or
    messages column, a classifier's text and label columns): refused before any work, in one line."""
    from fishmerge.io.data import check_columns, lm_fields, lm_token_ids, load_split
    from fishmerge.pipeline.metrics import CAUSAL_LM as LM

    kinds = task_kinds(cfg)
    for m in cfg.models:
        if m.data is None:
            continue
        kind = kinds.get(m.name)
        if kind is None:  # not a target: its data only feeds its Fisher (resolved by the Fisher job)
            continue
        lm_fields("causal_lm" if kind == LM else "sequence_classification", m.data.text_fields, m.data.messages_field)
        text = [m.data.messages_field] if m.data.messages_field else list(m.data.text_fields)
        wanted = text if kind == LM or not m.data.label_field else [*text, m.data.label_field]
        splits = set()
        if cfg.search:
            splits.add(cfg.search.split or m.data.eval_split)
        if cfg.evaluate:
            splits.add(cfg.evaluate.split or m.data.eval_split)
        for split in sorted(splits):
            dataset = load_split(m.data.path, split)
            try:
                check_columns(dataset.column_names, wanted, f"model '{m.name}' ({split}):")
            except FishmergeError as exc:
                raise FishmergeError(f"{exc}; fix `data:` of model '{m.name}'") from None
            if m.data.messages_field and len(dataset):  # the chat template renders the first conversation
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(m.path)
                lm_token_ids(tok, dataset[0], m.data.text_fields, m.data.messages_field, 10**6)


def check_scorers(cfg: MergeConfig) -> None:
    """Call each user scorer once, on the first target's own model and two rows of its search (or
    evaluation) split, so a scorer that raises or returns no finite number fails before any work."""
    from fishmerge.io.checkpoint import load_model
    from fishmerge.pipeline.metrics import call_scorer
    from fishmerge.pipeline.search import task_data

    specs = [cfg.search.metric] if cfg.search else []
    specs += list(cfg.evaluate.metrics) if cfg.evaluate else []
    user = {s: get_metric(s) for s in specs if get_metric(s).scorer is not None}
    if not user:
        return
    target = cfg.target_names[0]
    path = next(m.path for m in cfg.models if m.name == target)
    model, tok = load_model(path, device=cfg.execution.device)
    model.eval()
    split = (cfg.search.split if cfg.search else None) or (cfg.evaluate.split if cfg.evaluate else None)
    label2id = getattr(model.config, "label2id", None)
    task = task_data(cfg, target, split, 2, label2id, task_kinds(cfg)[target])
    for metric in user.values():
        call_scorer(metric, model, tok, task.rows)


def directions(cfg: MergeConfig) -> dict[str, bool]:
    """higher_is_better of every evaluated metric name (for promotion and the reports)."""
    names = list(cfg.evaluate.metrics or []) if cfg.evaluate else []
    return {key_name(m): get_metric(m).higher_is_better for m in names}


def content_key(plan: MergePlan, kind: str, extra: dict) -> str:
    """A cache key for search/evaluation results: the inputs (by content) and parameters the method
    reads, and the settings. Isotropic results are shared by every Fisher variant of a merge."""
    key = {
        "kind": kind,
        "version": __version__,
        "method": plan.method,
        "options": plan.params.model_dump(mode="json"),
        "models": [[m.name, m.fingerprint, m.fisher_id if plan.statistics else None] for m in plan.models],
        "base": plan.base.fingerprint if plan.base and plan.merge_method.needs_base else None,
        "targets": [t.name for t in plan.targets],
        **extra,
    }
    return kind + "-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached(key: str, compute, root: str = CACHE_ROOT):
    """Results computed once per content key (JSON beside the other fishmerge state)."""
    path = storage.join(storage.normalize(root), f"{key}.json")
    found = storage.read_json(path)
    if found is not None:
        return found, True
    value = compute()
    storage.write_json(path, value)
    return value, False


def data_fingerprints(scorer: Scorer) -> dict[str, str]:
    """Hashes of the rows each task is scored on and of how they are scored (cache keys change when the
    data does, a causal LM's tokenizer — it decides the tokens and the response mask —, or a scorer's code)."""
    from fishmerge.io.checkpoint import tokenizer_fingerprint
    from fishmerge.pipeline.metrics import CAUSAL_LM, scorer_fingerprint

    paths = {t.name: scorer.plan.models[t.index].path for t in scorer.plan.targets}
    how = {
        "scorers": {m: scorer_fingerprint(metric) for m, metric in scorer.metrics.items() if metric.scorer},
        "tokenizers": {n: tokenizer_fingerprint(paths[n]) for n, t in scorer.tasks.items() if t.kind == CAUSAL_LM},
    }
    out = {
        name: hashlib.sha256(
            json.dumps(
                [
                    task.rows,
                    None if task.labels is None else task.labels.tolist(),
                    task.text_fields,
                    task.messages_field,
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:20]
        for name, task in scorer.tasks.items()
    }
    if how["scorers"] or how["tokenizers"]:
        out["scoring"] = json.dumps(how, sort_keys=True)
    return out


def cached_search(cfg: MergeConfig, fishers: dict[str, str], method: str | None = None) -> dict:
    """The λ search of `cfg` (with its method, or `method`: a baseline's), computed once per content key:
    {'candidates', 'best', 'metric', 'method', 'cached', 'names'}."""
    settle_metrics(cfg)
    s = cfg.search
    plan = plan_for(cfg, fishers, method=method, check_output=False)
    ev = cfg.evaluate
    sizes = (ev.batch_size, ev.max_length) if ev else (32, 128)
    scorer = Scorer(cfg, plan, s.split, s.limit, cfg.execution.device, *sizes, metrics=[s.metric])
    lambdas = candidates(len(plan.models), s.strategy, s.points, s.seed)
    scoring = {"max_length": scorer.max_length, "device": cfg.execution.device}  # what can change a score
    key = content_key(
        plan,
        "search",
        {"search": s.model_dump(), "scoring": scoring, "data": data_fingerprints(scorer), "lambdas": lambdas},
    )

    def compute():
        inputs = load_inputs(plan)
        return search(scorer, inputs, lambdas, s.metric, s.workers, progress=True, desc=f"λ search ({plan.method})")

    result, hit = cached(key, compute)
    return {**result, "method": plan.method, "cached": hit, "names": [m.name for m in plan.models]}


def cached_evaluation(
    cfg: MergeConfig, plan: MergePlan, isotropic_weights: list[float] | None, merged_dirs: dict[str, str]
) -> dict:
    """The merged outputs of `plan` and the baselines on each task's evaluation split, each computed once
    per content key: {'results': {kind: {'<task>/<metric>': value}}, 'cached'}."""
    settle_metrics(cfg)
    ev = cfg.evaluate
    scorer = Scorer(
        cfg, plan, ev.split, ev.limit, cfg.execution.device, ev.batch_size, ev.max_length, metrics=list(ev.metrics)
    )
    settings = {"evaluate": ev.model_dump(), "data": data_fingerprints(scorer)}
    merged_key = content_key(plan, "evaluate-merged", {"plan": plan.plan_id, **settings})
    merged, merged_hit = cached(merged_key, lambda: evaluate_merged(scorer, merged_dirs, list(ev.metrics)))
    baseline_plan = isotropic_plan(plan)  # what the baselines depend on: models and data, no Fisher
    base_key = content_key(baseline_plan, "evaluate-baselines", {"iso": isotropic_weights, **settings})
    baselines, base_hit = cached(
        base_key,
        lambda: evaluate_baselines(
            scorer, load_inputs(baseline_plan), isotropic_weights, list(ev.metrics), list(ev.baselines)
        ),
    )
    return {"results": {**merged, **baselines}, "cached": merged_hit and base_hit}
