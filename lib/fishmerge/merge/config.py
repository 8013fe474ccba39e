"""The merge config (YAML), validated up front: unknown keys name the closest valid key.

Keys are a contract (issue 4): name, method, base, models[name, path, weight, fisher, data],
fisher{estimator, examples, floor, favor_target, normalize}, targets, output, dtype,
memory_limit. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from fishmerge.errors import FishmergeError
from fishmerge.fisher.options import FisherOptions
from fishmerge.fisher.statistics import STATISTICS
from fishmerge.io.model_ref import DEFAULT_REGISTRY_ROOT, REGISTRY_PREFIX, is_hub_id, resolve_hub_id, resolve_model_ref
from fishmerge.merge.methods import METHODS, get_method, params_in_section
from fishmerge.merge.methods.base import own_fields
from fishmerge.pipeline.metrics import check_metric_name
from fishmerge.schema import Strict, at_least
from fishmerge.sizes import parse_size

MLFLOW_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def check_tracking_uri(uri: str) -> str:
    """An MLflow tracking URI of a scheme MLflow serves (a typo fails here, not as 'no registered model')."""
    if "://" not in uri and not uri.startswith(("sqlite:", "file:", "databricks")):
        return uri  # a plain path: MLflow's file store
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in MLFLOW_SCHEMES:
        raise FishmergeError(
            f"unsupported MLflow tracking URI '{uri}': use sqlite:///path/mlflow.db, http(s)://host:port, "
            f"or another scheme MLflow serves ({', '.join(MLFLOW_SCHEMES)})"
        )
    return uri


class DataConfig(Strict):
    """A model's task data. Classifiers: one or two text columns and a label column. Causal LMs: one text
    column (plain text), two (prompt, response: only the response tokens count), or `messages_field`, a
    chat-style column of {role, content} turns rendered by the tokenizer's chat template (only the last
    turn counts); their label_field is not read."""

    path: str
    text_fields: list[str] = Field(default_factory=lambda: ["text"])
    label_field: str | None = "label"
    messages_field: str | None = None
    fisher_split: str = "train"
    eval_split: str = "validation"

    @field_validator("text_fields")
    @classmethod
    def _one_or_two(cls, v: list[str]) -> list[str]:
        if len(v) not in (1, 2):
            raise ValueError(f"takes one text column, or two (a pair; a causal LM's prompt and response), got {v}")
        return v


class ModelConfig(Strict):
    name: str
    path: str
    weight: float = 1.0
    fisher: str | None = None
    data: DataConfig | None = None
    # Accept a `fisher:` store that records no model_fingerprint (written by another tool). Off by default:
    # with it nothing checks that the store was computed for this model.
    fisher_without_fingerprint: bool = False

    @field_validator("weight")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"weight must be ≥ 0, got {v}")
        return v


class _FisherSection(FisherOptions):
    """The config's `fisher:` block: the Fisher options (one definition, `fishmerge.fisher.options`),
    the shards and store root of the pipeline's estimation, and the parameters of methods whose
    `config_section` is `fisher` (floor, favor_target, normalize)."""

    shards: int = 1
    store_root: str | None = None  # default: ./.fishmerge/fishers of the working directory

    _shards = at_least(1, "shards")


# The `fisher:` block also holds the parameters of the methods whose config_section is "fisher".
FisherSection = create_model("FisherSection", __base__=_FisherSection, **params_in_section("fisher"))

# Every other section a method declares (e.g. `regmean:`) is a block of its parameters alone.
METHOD_SECTIONS = {
    section: create_model(f"{section.title()}Section", __base__=Strict, **params_in_section(section))
    for section in sorted({m.config_section for m in METHODS.values()} - {None, "fisher"})
}


def _metric_name(spec: str) -> str:
    try:
        return check_metric_name(spec)
    except FishmergeError as exc:
        raise ValueError(str(exc)) from None


class SearchConfig(Strict):
    """λ search on validation data: a grid for 2 models, Dirichlet samples for more."""

    strategy: Literal["grid", "dirichlet"] | None = None  # default: grid for 2 models, dirichlet for K > 2
    points: int = 11  # grid points, or Dirichlet samples (plus the uniform λ)
    split: str = "validation"
    metric: str | None = None  # default: accuracy (classifiers), nll (causal LMs); or a scorer module:function
    limit: int | None = 500  # examples per task scored for each candidate
    seed: int = 0
    workers: int = 1  # candidates scored at once (threads, each with its own model copies)

    @field_validator("points")
    @classmethod
    def _points(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"points must be ≥ 2, got {v}")
        return v

    _counts = at_least(1, "limit", "workers")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        return v if v is None else _metric_name(v)


REFERENCES = ("originals", "ensemble")  # the baselines that are not merges


class EvaluateConfig(Strict):
    """Evaluation of the merged models and the baselines on each task's evaluation split."""

    split: str | None = None  # default: each model's data.eval_split
    metrics: list[str] | None = None  # default: [accuracy, f1] (classifiers), [nll, perplexity] (causal LMs)
    # What the merge is compared with: `originals` (each fine-tuned target alone), `ensemble` (output
    # ensembling) and any merge method by name (isotropic, task_arithmetic, ties, fisher, regmean, ...),
    # each with its own validation search when the pipeline searches; reported side by side in this order.
    baselines: list[str] = Field(default_factory=lambda: ["originals", "isotropic", "ensemble"])
    limit: int | None = None  # examples per task (default: the whole split)
    batch_size: int = 32
    max_length: int = 128

    _counts = at_least(1, "limit", "batch_size")
    _length = at_least(2, "max_length")

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        valid = [*REFERENCES, *METHODS]
        unknown = [b for b in v if b not in valid]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}: choose from {', '.join(valid)}")
        dupes = sorted({b for b in v if v.count(b) > 1})
        if dupes:
            raise ValueError(f"baselines named twice: {dupes}")
        return v

    @property
    def methods(self) -> list[str]:
        """The merge methods among the baselines, in their order."""
        return [b for b in self.baselines if b in METHODS]

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("lists no metric: name at least one, or leave it out for the defaults")
        return v if v is None else [_metric_name(m) for m in v]


class PromoteConfig(Strict):
    """Promote when `metric` is better than the champion's by at least `min_delta` (in the metric's own
    direction: higher accuracy, lower nll) and every guarded metric changed by at least its tolerance in
    its direction (-0.01: may get worse by up to 0.01)."""

    metric: str  # e.g. rte/accuracy, reviews/nll
    min_delta: float = 0.0
    guard: dict[str, float] = Field(default_factory=dict)  # metric -> allowed change (e.g. -0.01)


class RegisterConfig(Strict):
    name: str  # one registered model per target: <name>, or <name>-<target> for several targets
    promote: PromoteConfig | None = None


class MlflowConfig(Strict):
    tracking_uri: str | None = None  # env MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db
    experiment: str | None = None  # default: the config's name

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_tracking_uri(v)
            except FishmergeError as exc:
                raise ValueError(str(exc)) from None
        return v


class ExecutionConfig(Strict):
    dask_address: str | None = None
    device: str = "auto"


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)  # BaseModel.register is ABC's


class _MergeConfig(Strict):
    name: str
    method: str = "fisher"
    base: str | None = None
    models: list[ModelConfig]
    fisher: FisherSection = Field(default_factory=FisherSection)
    targets: list[str] | None = None
    output: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    memory_limit: int = 2 * 10**9
    shard_size: int = 2 * 10**9
    # The pipeline (`fishmerge run`): all optional; `fishmerge merge` ignores them.
    search: SearchConfig | None = None
    evaluate: EvaluateConfig | None = None
    register: RegisterConfig | None = None
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @field_validator("memory_limit", "shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        if isinstance(v, bool):
            raise ValueError(f"not a size: {v!r} (try 2GB or 512MiB)")
        size = parse_size(v)  # refuses NaN/Inf and absurd sizes
        if size <= 0:
            raise ValueError(f"must be a positive size (e.g. 2GB), got {v!r}")
        return size

    @field_validator("name", "output")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}': choose one of {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        names = [m.name for m in self.models]
        if len(self.models) < 2:
            raise ValueError("a merge needs at least two models")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique: {dupes}")
        if sum(m.weight for m in self.models) <= 0:
            raise ValueError("model weights sum to 0: give at least one model a positive weight")
        lacking = [m.name for m in self.models if not m.fisher and not m.data]
        for method in self.merge_methods:
            role = "method" if method == self.method else "baseline"
            if METHODS[method].needs_base and not self.base:
                raise ValueError(f"{role} '{method}' needs `base:` (the pretrained model the others were tuned from)")
            needed = METHODS[method].statistics(self.method_params(method))
            if needed and lacking:
                what = " and ".join({"fisher": "Fishers", "gram": "Grams"}[s] for s in needed)
                raise ValueError(
                    f"{role} '{method}' needs `fisher:` (a store holding its {what}) or `data:` "
                    f"(to estimate them) for model(s) {lacking}"
                )
        unknown = [t for t in self.targets or [] if t not in names]
        if unknown:
            raise ValueError(f"targets {unknown} are not model names ({', '.join(names)})")
        return self

    @property
    def merge_methods(self) -> list[str]:
        """The merge method, then the methods it is compared with (`evaluate.baselines`)."""
        compared = self.evaluate.methods if self.evaluate else []
        return [self.method, *(m for m in compared if m != self.method)]

    @property
    def target_names(self) -> list[str]:
        return self.targets or [m.name for m in self.models]

    def method_params(self, method: str | None = None):
        """The validated parameters of `method` (default: the config's), read from where it declares them
        (those of the methods it borrows from, from theirs)."""
        m = get_method(method or self.method)
        section = getattr(self, m.config_section) if m.config_section else self
        values = {k: getattr(section, k) for k in own_fields(m)}
        for other in m.borrows:
            values.update(self.method_params(other).model_dump())
        return m.Params.model_validate(values)

    def with_params(self, method: str, values: dict) -> MergeConfig:
        """A copy with `method`'s own parameters set to `values` where it declares them (e.g. the scale a
        search chose); parameters it borrows from another method stay as they are."""
        m = get_method(method)
        section = m.config_section
        own = {k: v for k, v in values.items() if k in own_fields(m)}
        if section is None:
            return self.model_copy(update=own)
        return self.model_copy(update={section: getattr(self, section).model_copy(update=own)})

    def estimated_statistics(self) -> list[str]:
        """The statistics estimated from a model's `data:`: what the methods read (the merge's and those it
        is compared with), plus `fisher.statistics`
        when the config names them (e.g. Fishers beside regmean's Grams, for `regmean.rest`)."""
        wanted = {s for m in self.merge_methods for s in METHODS[m].statistics(self.method_params(m))}
        if "statistics" in self.fisher.model_fields_set:
            wanted |= set(self.fisher.statistics)
        return [s for s in STATISTICS if s in wanted]


# Top-level keys also hold the parameters of the methods whose config_section is None (scale, density).
# (`register` is declared again here: on a subclass pydantic would take ABCMeta.register for its default.)
MergeConfig = create_model(
    "MergeConfig",
    __base__=_MergeConfig,
    register=(RegisterConfig | None, None),
    **{section: (model, Field(default_factory=model)) for section, model in METHOD_SECTIONS.items()},
    **params_in_section(None),
)


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the config section at a pydantic error location."""
    model: type[BaseModel] = MergeConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        for cand in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(cand, "__args__", (cand,))
            sub = next((c for c in (cand, *inner) if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub:
                model = sub
                break
    return list(model.model_fields)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


MAX_CONFIG_BYTES = 10 * 2**20


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge config; every problem is reported at once, by key path."""
    p = Path(path)
    if p.is_dir():
        raise FishmergeError(f"config '{p}' is a folder: pass the merge config file (YAML)")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise FishmergeError(f"config '{p}' is {p.stat().st_size} bytes: not a merge config (YAML)")
        raw = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise FishmergeError(f"config '{p}' does not exist") from exc
    except UnicodeDecodeError as exc:
        raise FishmergeError(f"config '{p}' is not a text file: pass the merge config (YAML)") from exc
    except OSError as exc:
        raise FishmergeError(f"cannot read config '{p}': {exc}") from exc
    except yaml.YAMLError as exc:
        raise FishmergeError(f"config '{p}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise FishmergeError(f"config '{p}' must be a mapping of keys (name, method, models, output, …)")
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                valid = _fields_at(loc)
                close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
                problems.append(f"{_where(loc)}: unknown key; {hint}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "finite_number":
                    msg = "must be a finite number (not NaN or Inf)"
                problems.append(f"{_where(loc) or 'config'}: {msg}")
        if len(problems) == 1:
            raise FishmergeError(f"config '{p}': {problems[0]}") from None
        raise FishmergeError(f"config '{p}' has {len(problems)} problems:\n  " + "\n  ".join(problems)) from None
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: MergeConfig, root: Path) -> MergeConfig:
    def fix(value: str | None) -> str | None:
        if value is None or "://" in value or value.startswith(REGISTRY_PREFIX) or Path(value).is_absolute():
            return value
        return str((root / value).resolve())

    def fix_model(value: str | None) -> str | None:
        """A model: a folder relative to the config when one is there, else a hub id stays one."""
        if value is not None and is_hub_id(value) and not (root / value).exists():
            return value
        return fix(value)

    cfg.base = fix_model(cfg.base)
    cfg.output = fix(cfg.output)
    cfg.fisher.store_root = fix(cfg.fisher.store_root)
    for m in cfg.models:
        m.path, m.fisher = fix_model(m.path), fix(m.fisher)
        if m.data:
            m.data.path = fix(m.data.path)
    return cfg


def resolve_model_refs(cfg: MergeConfig, registry_root: str | Path = DEFAULT_REGISTRY_ROOT) -> MergeConfig:
    """Every model (and the base) as a local folder, in place: hub ids from the local Hugging Face cache,
    `models:/Name@alias` from the config's registry (`mlflow.tracking_uri`), folders as they are."""
    uri = cfg.mlflow.tracking_uri

    def resolve(ref: str) -> str:
        # After _resolve_paths a folder is absolute; a relative value is a hub id with no folder of its name
        # beside the config: looked up in the HF cache only, never against the working folder.
        if ref.startswith(REGISTRY_PREFIX) or Path(ref).is_absolute():
            return resolve_model_ref(ref, registry_root, uri)
        return resolve_hub_id(ref, beside="the config's folder")

    cfg.base = resolve(cfg.base) if cfg.base else cfg.base
    for m in cfg.models:
        m.path = resolve(m.path)
    return cfg


def fisher_specs(cfg: MergeConfig) -> dict[str, dict]:
    """FisherSpec fields (fishmerge.fisher.job) for each model whose Fisher is estimated from its `data:`."""
    out = {}
    statistics = cfg.estimated_statistics()
    for m in cfg.models:
        if m.fisher or not m.data or not statistics:
            continue
        out[m.name] = {
            "model": m.path,
            "data": m.data.path,
            "split": m.data.fisher_split,
            "text_fields": list(m.data.text_fields),
            "label_field": m.data.label_field,
            "messages_field": m.data.messages_field,
            **{k: getattr(cfg.fisher, k) for k in FisherOptions.model_fields},
            "statistics": statistics,
            "device": cfg.execution.device,
        }
    return out
