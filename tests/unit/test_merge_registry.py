"""Every registered merge method, through its declarations only: the config accepts its parameters
where it says, each parameter can change the result, `per_target` is true to the formula, and the
λ search's in-memory merge (pre-passes by the executor's own step) equals the out-of-core output."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
import pytest
import zarr
from fishmerge.fisher.store import write_fisher_store
from fishmerge.io.checkpoint import cached_model_fingerprint
from fishmerge.io.safetensors import tensor_index
from fishmerge.merge.config import MergeConfig, load_merge_config
from fishmerge.merge.executor import execute
from fishmerge.merge.methods import METHODS
from fishmerge.merge.plan import build_plan, format_plan, plan_for
from fishmerge.pipeline.search import load_inputs, merge_in_memory
from safetensors.numpy import load_file

from tests.conftest import save_model_dir


def _fisher(model_dir: Path, seed: int) -> str:
    """A store with random Fishers (exact zeros among them) and, for every Linear weight, a random
    positive definite Gram (format v2, written with zarr): what every method may read."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, ref in tensor_index(model_dir).items():
        f = rng.exponential(size=ref.shape).astype(np.float32)
        f.reshape(-1)[::7] = 0.0  # exact zeros: the floor matters
        tensors[key] = f
    uri = str(model_dir) + ".fisher.zarr"
    attrs = {"estimator": "synthetic", "n_examples": 1, "data_fingerprint": "synthetic"}
    write_fisher_store(uri, tensors, {**attrs, "model_fingerprint": cached_model_fingerprint(model_dir)})
    group = zarr.open_group(uri, mode="a")
    grams = {}
    for key, ref in tensor_index(model_dir).items():
        if len(ref.shape) == 2 and "embeddings" not in key:  # BERT's Linear weights (out, in)
            x = rng.standard_normal((4 * ref.shape[1], ref.shape[1]))
            group.require_group("gram").create_array(key, data=(x.T @ x).astype(np.float32), compressors=None)
            grams[key] = {"array": f"gram/{key}", "tokens": 4 * ref.shape[1], "layout": "out_in"}
    group.attrs.update({"format_version": 2, "statistics": ["fisher", "gram"], "grams": grams})
    return uri


def section_of(method, pname: str) -> str | None:
    """The config section holding parameter `pname` of `method` (a borrowed one sits in its owner's)."""
    for other in method.borrows:
        if pname in METHODS[other].Params.model_fields:
            return METHODS[other].config_section
    return method.config_section


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    base = save_model_dir(root / "base", "bert-cls", seed=0)
    models = {n: save_model_dir(root / n, "bert-cls", seed=s) for n, s in (("a", 1), ("b", 2))}
    return {
        "root": root,
        "base": str(base),
        "models": {n: str(p) for n, p in models.items()},
        "fishers": {n: _fisher(p, i) for i, (n, p) in enumerate(models.items())},
    }


def raw_config(zoo: dict, method: str, output: str, **params) -> dict:
    m = METHODS[method]
    stats = m.statistics(m.Params())
    raw = {
        "name": f"reg-{method}",
        "method": method,
        "models": [
            {"name": n, "path": p, "weight": w, **({"fisher": zoo["fishers"][n]} if stats else {})}
            for (n, p), w in zip(zoo["models"].items(), (0.7, 0.4))
        ],
        "output": output,
        "dtype": "float32",
        **({"base": zoo["base"]} if m.needs_base else {}),
    }
    for pname, value in params.items():
        where = section_of(m, pname)
        (raw.setdefault(where, {}) if where else raw)[pname] = value
    return raw


def changed_value(field):
    """A valid value other than the default: the negated bool, another choice of a Literal (the last
    one), or a number the validators accept."""
    if field.annotation is bool or isinstance(field.default, bool):
        return not field.default
    if typing.get_origin(field.annotation) is typing.Literal:
        return typing.get_args(field.annotation)[-1]
    return 0.5 if field.default != 0.5 else 0.9


def merged(plan, target: int) -> dict[str, np.ndarray]:
    return merge_in_memory(plan, load_inputs(plan), plan.weights, target)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_through_its_declarations(zoo, name, tmp_path: Path) -> None:
    method = METHODS[name]
    cfg = MergeConfig.model_validate(raw_config(zoo, name, str(tmp_path / "out")))
    plan = build_plan(cfg)
    # the config's defaults are the method's own (with the choices left to the inputs made)
    assert plan.params == method.resolve_params(method.Params(), ["fisher", "gram"])
    assert set(method.tracked_params(plan.params)) == set(method.Params.model_fields)
    text = format_plan(plan)
    assert all(f"{p}=" in text for p in method.Params.model_fields)

    # Each parameter, given in its declared config section, reaches the formula and can change it.
    reference = merged(plan, 0)
    for pname, field in method.Params.model_fields.items():
        value = changed_value(field)
        other = build_plan(MergeConfig.model_validate(raw_config(zoo, name, str(tmp_path / "o2"), **{pname: value})))
        assert getattr(other.params, pname) == value
        out = merged(other, 0)
        assert any(not np.array_equal(out[k], reference[k]) for k in reference), f"{name}.{pname} changes nothing"

    # per_target says whether the result depends on the target.
    differs = any(not np.array_equal(merged(plan, 1)[k], reference[k]) for k in reference)
    assert differs == method.per_target

    # The λ search's in-memory merge equals the out-of-core executor's output, bit for bit (fp32).
    execute(plan, progress=False)
    for t in plan.targets:
        out = load_file(str(Path(plan.output) / t.name / "model.safetensors"))
        mem = merged(plan, t.index)
        for key in plan.shared:
            np.testing.assert_array_equal(out[key], mem[key].astype(np.float32), err_msg=f"{name} {t.name} {key}")
        record = json.loads((Path(plan.output) / t.name / "fishmerge.json").read_text())
        assert {k: record["options"][k] for k in method.Params.model_fields} == plan.params.model_dump(mode="json")


def test_a_method_parameter_belongs_to_its_declared_section(zoo, tmp_path: Path) -> None:
    """Parameters are config keys where the method declares them, and only there."""
    for name, method in METHODS.items():
        for pname in method.Params.model_fields:
            wrong = raw_config(zoo, name, str(tmp_path / "o"))
            if section_of(method, pname):
                wrong[pname] = changed_value(method.Params.model_fields[pname])
            else:
                wrong.setdefault("fisher", {})[pname] = changed_value(method.Params.model_fields[pname])
            path = tmp_path / f"{name}-{pname}.yaml"
            path.write_text(json.dumps(wrong))
            with pytest.raises(Exception, match="unknown key"):
                load_merge_config(path)


def test_plan_for_leaves_the_config_as_it_is(zoo, tmp_path: Path) -> None:
    cfg = MergeConfig.model_validate(raw_config(zoo, "fisher", str(tmp_path / "out")))
    plan = plan_for(cfg, weights={"a": 0.1, "b": 0.9}, method="isotropic", check_output=False)
    assert plan.method == "isotropic" and plan.weights == pytest.approx([0.1, 0.9])
    assert cfg.method == "fisher" and [m.weight for m in cfg.models] == [0.7, 0.4]


def test_a_new_method_is_one_registered_class(zoo, tmp_path: Path, monkeypatch) -> None:
    """A method declared only by its class (here: each target keeps its own body, scaled) is validated,
    planned and executed per target although it reads no Fisher (per_target is declared, not inferred)."""
    from fishmerge.merge.methods import MergeMethod

    class KeepTarget(MergeMethod):
        name = "keep_target"
        per_target = True

        def merge(self, thetas, weights, *, target=0, **_):
            return thetas[target] * np.float32(0.5)

    monkeypatch.setitem(METHODS, KeepTarget.name, KeepTarget())
    plan = build_plan(MergeConfig.model_validate(raw_config(zoo, "keep_target", str(tmp_path / "out"))))
    execute(plan, progress=False)
    for t in plan.targets:
        out = load_file(str(Path(plan.output) / t.name / "model.safetensors"))
        own = load_file(str(Path(plan.models[t.index].path) / "model.safetensors"))
        for key in plan.shared:
            np.testing.assert_array_equal(out[key], own[key] * np.float32(0.5))


@pytest.mark.parametrize("name", list(METHODS))
def test_mlflow_params_are_the_methods_own(zoo, name, tmp_path: Path) -> None:
    """The pipeline's MLflow run logs exactly the parameters the method declares (e.g. scale and
    density for ties, never floor/favor_target/normalize), on a real SQLite MLflow."""
    from fishmerge.registry.tracking import log_pipeline_run
    from mlflow import MlflowClient

    method = METHODS[name]
    cfg = MergeConfig.model_validate(raw_config(zoo, name, str(tmp_path / "out"), **{}))
    plan = build_plan(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = log_pipeline_run(cfg, "", plan, {}, {}, {}, uri)
    params = MlflowClient(uri).get_run(run["run_id"]).data.params
    method_keys = {k for k in params if k not in ("method", "targets") and not k.startswith("lambda/")}
    fisher_keys = {"estimator", "fisher_examples"} if "fisher" in plan.statistics else set()
    assert method_keys == set(method.Params.model_fields) | fisher_keys
    assert params["method"] == name
