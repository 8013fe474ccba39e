"""The metrics a merge is searched, evaluated and promoted by, each with its direction.

Built in: `accuracy`, `f1` (classifiers, higher is better) and `nll` (mean next-token negative
log-likelihood, nats per counted token), `perplexity` (exp of it) for causal LMs, lower is better.
A user scorer is named `module:function`: it is called as `function(model, tokenizer, rows)` (the
Hugging Face model in eval mode, its tokenizer, the task's rows as dicts) and returns a finite
number; it declares its direction with the `scorer` decorator (or a `direction` attribute of
"higher" or "lower"). Metric keys in results, MLflow and promotion are `<task>/<metric>`; a user
scorer's metric is named `module.function` there (MLflow names cannot hold ':').
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fishmerge.errors import FishmergeError

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"
DIRECTIONS = ("higher", "lower")


@dataclass(frozen=True)
class Metric:
    """A metric: its key name, its direction, which task kind it scores (None: any), and for a user scorer
    the function to call."""

    name: str
    higher_is_better: bool
    task: str | None
    scorer: Callable | None = None
    spec: str | None = None  # `module:function` of a user scorer
    bounded: bool = False  # always within [0, 1] (plots share that axis)

    def better(self, a: float, b: float) -> bool:
        """a strictly better than b."""
        return a > b if self.higher_is_better else a < b

    def improvement(self, new: float, old: float) -> float:
        """How much better new is than old (negative: worse), in the metric's units."""
        return new - old if self.higher_is_better else old - new

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


BUILTIN: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, CLASSIFICATION, bounded=True),
    "f1": Metric("f1", True, CLASSIFICATION, bounded=True),
    "nll": Metric("nll", False, CAUSAL_LM),
    "perplexity": Metric("perplexity", False, CAUSAL_LM),
}
DEFAULTS = {CLASSIFICATION: ["accuracy", "f1"], CAUSAL_LM: ["nll", "perplexity"]}  # search: the first
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def scorer(direction: str):
    """Declare a user scorer's direction: `@scorer("lower")` or `@scorer("higher")`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def mark(fn):
        fn.direction = direction
        return fn

    return mark


def task_kind(head: str) -> str:
    """The metric family of a model head: causal LMs are scored by likelihood, everything else by class."""
    return CAUSAL_LM if head == CAUSAL_LM else CLASSIFICATION


def key_name(spec: str) -> str:
    """A metric's name in result keys: a user scorer's `module:function` becomes `module.function`."""
    return spec.replace(":", ".")


def check_metric_name(spec: str) -> str:
    """A built-in metric's name or a `module:function` spelling (nothing imported: the config's check)."""
    if spec in BUILTIN:
        return spec
    if ":" not in spec:
        raise FishmergeError(
            f"unknown metric '{spec}': use {', '.join(BUILTIN)}, or a scorer of your own as module:function"
        )
    if not _SPEC.match(spec):
        raise FishmergeError(f"metric '{spec}' is not module:function (e.g. my_scorers:keyword_rate)")
    return spec


def get_metric(spec: str) -> Metric:
    """The metric a config names: a built-in, or a user scorer `module:function` (imported and checked now,
    before any work, so a typo or a scorer without a direction fails in one line)."""
    if check_metric_name(spec) in BUILTIN:
        return BUILTIN[spec]
    module_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing on import
        raise FishmergeError(
            f"scorer '{spec}': cannot import module '{module_name}' ({type(exc).__name__}: {exc}); put it on "
            "PYTHONPATH or install it"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise FishmergeError(f"scorer '{spec}': module '{module_name}' has no function '{fn_name}'")
    direction = getattr(fn, "direction", None)
    if direction not in DIRECTIONS:
        raise FishmergeError(
            f"scorer '{spec}' does not declare its direction: decorate it with "
            "@fishmerge.pipeline.metrics.scorer('higher') or ('lower'), or set its `direction` attribute"
        )
    return Metric(key_name(spec), direction == "higher", None, fn, spec)


def metric_of_key(key: str, user: dict[str, Metric] | None = None) -> Metric:
    """The metric of a result key `<kind>/<task>/<metric>` or `<task>/<metric>` (its last part)."""
    name = key.rsplit("/", 1)[-1]
    if name in BUILTIN:
        return BUILTIN[name]
    if user and name in user:
        return user[name]
    raise FishmergeError(
        f"cannot tell whether a higher or a lower '{key}' is better: name a built-in metric "
        f"({', '.join(BUILTIN)}) or one the pipeline evaluates"
    )


def scorer_fingerprint(metric: Metric) -> str | None:
    """Hash of a user scorer's module source (cache keys change when its code does; the modules it imports
    are not hashed). A scorer without a source file gets a key of its own each run: nothing is reused."""
    if metric.scorer is None:
        return None
    try:
        source = inspect.getsourcefile(metric.scorer)
        return "sha256:" + hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else str(uuid.uuid4())
    except (TypeError, OSError):
        return str(uuid.uuid4())


def check_applies(metric: Metric, kind: str, target: str, where: str) -> None:
    """Refuse a metric of the other task kind (perplexity of a classifier, accuracy of an LM) up front."""
    if metric.task is not None and metric.task != kind:
        other = ", ".join(DEFAULTS[kind])
        what = "causal LM" if kind == CAUSAL_LM else "classifier"
        raise FishmergeError(
            f"{where} '{metric.name}' scores {'causal LMs' if metric.task == CAUSAL_LM else 'classifiers'}, but "
            f"target '{target}' is a {what}: use {other}, or a scorer of your own (module:function)"
        )


def call_scorer(metric: Metric, model, tokenizer, rows: list[dict]) -> float:
    """A user scorer's value, refused unless it is one finite number (its errors name it)."""
    try:
        value = metric.scorer(model, tokenizer, rows)
    except Exception as exc:
        raise FishmergeError(f"scorer '{metric.spec}' raised {type(exc).__name__}: {exc}") from None
    try:  # a number (numpy and torch scalars too), not a bool, a string or a sequence
        if isinstance(value, bool) or not hasattr(value, "__float__"):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise FishmergeError(
            f"scorer '{metric.spec}' returned {type(value).__name__} {value!r}: return one number"
        ) from None
    if not math.isfinite(value):
        raise FishmergeError(f"scorer '{metric.spec}' returned {value}: return a finite number")
    return value
