"""The pipeline's λ search and evaluation, cached by content: merged models against the baselines,
on each target's own task.

Merged outputs and baselines are evaluated (and cached) apart: the references read no Fisher, so
every Fisher variant of a merge shares them. Baselines: `originals` (each fine-tuned target model
alone), `ensemble` (output ensembling: the average of the class probabilities that every model's
body gives under the target's head, or of causal LMs' next-token distributions; equal weights), and
any merge method by name (`isotropic`, `task_arithmetic`, `ties`, `fisher`, `regmean`, …), each with
λ (or scale, density) of its own validation search, merged in memory with the plan's inputs. Metric
keys are `<task>/<metric>`, e.g. `rte/accuracy`, `reviews/nll`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from fishmerge import __version__
from fishmerge.errors import FishmergeError
from fishmerge.io import storage
from fishmerge.merge.config import REFERENCES, MergeConfig
from fishmerge.merge.methods import get_method
from fishmerge.merge.plan import MergePlan, plan_for
from fishmerge.pipeline.metrics import DEFAULTS as DEFAULT_METRICS
from fishmerge.pipeline.metrics import check_applies, get_metric, key_name, task_kind
from fishmerge.pipeline.search import MergeInputs, Scorer, candidates, load_inputs, load_state, merge_in_memory, search

CACHE_ROOT = "./.fishmerge/cache"
REFERENCE_METHOD = "isotropic"  # the references' plan: plain averaging (it reads no Fisher, no base)


def reference_plan(plan: MergePlan) -> MergePlan:
    """The same merge with plain averaging: what the references (originals, ensemble) depend on —
    models and data, no Fisher, no base."""
    method = get_method(REFERENCE_METHOD)
    return dataclasses.replace(plan, method=method.name, params=method.Params(), base=None, base_keys={})


def compared_methods(cfg: MergeConfig) -> list[str]:
    """The merge methods the merge is compared with (`evaluate.baselines`), the merge's own left out."""
    return cfg.merge_methods[1:]


def configured_choice(cfg: MergeConfig, method: str) -> dict:
    """A method's λ and parameters as the config gives them (no search): {'weights', 'params'}."""
    m = get_method(method)
    weights = [float(w) for w in m.check_weights([x.weight for x in cfg.models])]
    return {"weights": weights, "params": cfg.method_params(method).model_dump(mode="json")}


def best_choice(found: dict) -> dict:
    """The chosen candidate of a search: {'weights', 'params'}."""
    best = found["candidates"][found["best"]]
    return {"weights": best["weights"], "params": best.get("params", {})}


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


def evaluate_references(
    scorer: Scorer, inputs: MergeInputs, metrics: list[str], references: list[str]
) -> dict[str, dict[str, float]]:
    """{'originals'|'ensemble': {'<task>/<metric>': value}}; neither reads a Fisher. The ensemble is
    scored by the built-in metrics only (a user scorer is called with one model)."""
    from fishmerge.io.checkpoint import load_model

    plan = scorer.plan
    out: dict[str, dict[str, float]] = {r: {} for r in references}
    for t in plan.targets:
        if "originals" in references:
            original, _ = load_model(plan.models[t.index].path, device=_device_of(scorer, t.name))
            _record(out, "originals", t.name, scorer.score(t.name, metrics, original))
            del original
        if "ensemble" in references:
            outputs = []
            for theta in inputs.thetas:  # every model's body under this target's head (an LM: every model)
                load_state(scorer.models[t.name], theta)
                outputs.append(scorer.outputs(t.name))
            _record(out, "ensemble", t.name, scorer.ensemble(t.name, outputs, metrics))
    return out


def evaluate_method(scorer: Scorer, inputs: MergeInputs, weights: list[float], metrics: list[str]) -> dict:
    """{'<task>/<metric>': value} of the scorer's plan merged in memory with λ = weights, on every target."""
    out: dict[str, float] = {}
    shared: dict = {}
    for t in scorer.plan.targets:
        load_state(scorer.models[t.name], merge_in_memory(scorer.plan, inputs, weights, t.index, shared))
        out.update({f"{t.name}/{k}": v for k, v in scorer.score(t.name, metrics).items()})
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


def method_plan(cfg: MergeConfig, fishers: dict[str, str], method: str, params: dict | None = None) -> MergePlan:
    """The plan of `method` over the config's inputs (its parameters set to `params` when given)."""
    c = cfg.with_params(method, params) if params else cfg
    return plan_for(c, fishers, method=method, check_output=False)


def cached_search(cfg: MergeConfig, fishers: dict[str, str], method: str | None = None) -> dict:
    """The validation search of `cfg`'s method (or of `method`, one it is compared with), computed once
    per content key: {'candidates', 'best', 'metric', 'method', 'cached', 'names'}. The candidates are
    the method's own (`MergeMethod.search_candidates`): λ for most methods, scale (and density) for
    task arithmetic and TIES."""
    settle_metrics(cfg)
    s = cfg.search
    plan = method_plan(cfg, fishers, method or cfg.method)
    ev = cfg.evaluate
    sizes = (ev.batch_size, ev.max_length) if ev else (32, 128)
    scorer = Scorer(cfg, plan, s.split, s.limit, cfg.execution.device, *sizes, metrics=[s.metric])
    lambdas = candidates(len(plan.models), s.strategy, s.points, s.seed)
    pairs = plan.merge_method.search_candidates(plan.params, lambdas)
    tried = [[p.model_dump(mode="json"), w] for p, w in pairs]
    scoring = {"max_length": scorer.max_length, "device": cfg.execution.device}  # what can change a score
    key = content_key(
        plan,
        "search",
        {"search": s.model_dump(), "scoring": scoring, "data": data_fingerprints(scorer), "candidates": tried},
    )

    def compute():
        inputs = load_inputs(plan)
        return search(
            scorer,
            inputs,
            [w for _, w in pairs],
            s.metric,
            s.workers,
            progress=True,
            desc=f"search ({plan.method})",
            params=[p for p, _ in pairs],
        )

    result, hit = cached(key, compute)
    return {**result, "method": plan.method, "cached": hit, "names": [m.name for m in plan.models]}


def cached_evaluation(
    cfg: MergeConfig, fishers: dict[str, str], plan: MergePlan, compared: dict[str, dict], merged_dirs: dict[str, str]
) -> dict:
    """The merged outputs of `plan`, the methods it is compared with (`compared`: method -> its chosen
    {'weights', 'params'}, merged in memory) and the references, on each task's evaluation split, each
    computed once per content key: {'results': {kind: {'<task>/<metric>': value}}, 'cached'} with the
    kinds in `evaluate.baselines` order after 'merged'."""
    settle_metrics(cfg)
    ev = cfg.evaluate
    metrics = list(ev.metrics)

    scorer = Scorer(cfg, plan, ev.split, ev.limit, cfg.execution.device, ev.batch_size, ev.max_length, metrics=metrics)

    settings = {"evaluate": ev.model_dump(), "data": data_fingerprints(scorer)}
    hits = []
    merged_key = content_key(plan, "evaluate-merged", {"plan": plan.plan_id, **settings})
    merged, hit = cached(merged_key, lambda: evaluate_merged(scorer, merged_dirs, metrics))
    hits.append(hit)
    by_kind = dict(merged)
    for name, choice in compared.items():
        p = method_plan(cfg, fishers, name, choice["params"])
        key = content_key(p, "evaluate-method", {"weights": choice["weights"], **settings})
        values, hit = cached(
            key, lambda p=p, w=choice["weights"]: evaluate_method(scorer.for_plan(p), load_inputs(p), w, metrics)
        )
        by_kind[name] = values
        hits.append(hit)
    references = [b for b in ev.baselines if b in REFERENCES]
    if references:
        ref_plan = reference_plan(plan)
        key = content_key(ref_plan, "evaluate-references", {"references": references, **settings})
        values, hit = cached(
            key, lambda: evaluate_references(scorer.for_plan(ref_plan), load_inputs(ref_plan), metrics, references)
        )
        by_kind.update(values)
        hits.append(hit)
    order = ["merged", *(b for b in ev.baselines if b in by_kind and b != "merged")]
    return {"results": {k: by_kind[k] for k in order}, "cached": all(hits)}
