"""Merge config: the contract keys, closest-key hints, all problems at once, relative paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fishmerge.errors import FishmergeError
from fishmerge.merge.config import load_merge_config
from fishmerge.sizes import parse_size

GOOD = """
name: rte-mnli
method: fisher
base: ./models/pretrained
models:
  - name: rte
    path: ./models/rte
    weight: 0.7
    fisher: ./fishers/rte.zarr
    data: {path: ./data/rte, text_fields: [sentence1, sentence2], label_field: label,
           fisher_split: train, eval_split: validation}
  - name: mnli
    path: ./models/mnli
    weight: 0.3
    fisher: ./fishers/mnli.zarr
fisher: {estimator: exact, examples: 4096, floor: 1.0e-6, favor_target: true, normalize: true}
targets: [rte]
output: ./merged/rte-mnli
dtype: auto
memory_limit: 2GB
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return p


def test_the_contract_example_loads(tmp_path) -> None:
    cfg = load_merge_config(write(tmp_path, GOOD))
    assert cfg.method == "fisher" and cfg.memory_limit == 2 * 10**9
    assert cfg.models[0].data.text_fields == ["sentence1", "sentence2"]
    assert cfg.fisher.normalize is True and cfg.target_names == ["rte"]
    assert cfg.models[1].path == str((tmp_path / "models/mnli").resolve())
    assert cfg.output == str((tmp_path / "merged/rte-mnli").resolve())


def test_unknown_keys_name_the_closest_valid_key_and_all_problems_are_listed(tmp_path) -> None:
    bad = GOOD.replace("weight: 0.7", "wieght: 0.7").replace("memory_limit", "memory_limt")
    bad = bad.replace("favor_target: true", "favour_target: true")
    with pytest.raises(FishmergeError) as err:
        load_merge_config(write(tmp_path, bad))
    msg = str(err.value)
    assert "3 problems" in msg
    assert "models[0].wieght: unknown key; did you mean 'weight'?" in msg
    assert "memory_limt: unknown key; did you mean 'memory_limit'?" in msg
    assert "fisher.favour_target: unknown key; did you mean 'favor_target'?" in msg


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("method: fisher", "method: slerp"), "unknown method 'slerp'"),
        (("method: fisher\nbase: ./models/pretrained", "method: ties"), "needs `base:`"),
        (("weight: 0.7", "weight: -1"), "weight must be ≥ 0"),
        (("targets: [rte]", "targets: [qnli]"), "targets ['qnli']"),
        (("name: mnli", "name: rte"), "unique"),
        (("memory_limit: 2GB", "memory_limit: lots"), "not a size"),
    ],
)
def test_bad_values(tmp_path, change, needle) -> None:
    with pytest.raises(FishmergeError, match=None) as err:
        load_merge_config(write(tmp_path, GOOD.replace(*change)))
    assert needle in str(err.value)


def test_weights_summing_to_zero_and_missing_fisher(tmp_path) -> None:
    text = GOOD.replace("weight: 0.7", "weight: 0").replace("weight: 0.3", "weight: 0")
    with pytest.raises(FishmergeError, match="sum to 0"):
        load_merge_config(write(tmp_path, text))
    text = GOOD.replace("    fisher: ./fishers/mnli.zarr\n", "")
    with pytest.raises(FishmergeError, match=r"needs `fisher:` .* \['mnli'\]"):
        load_merge_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(FishmergeError, match="does not exist"):
        load_merge_config(tmp_path / "nope.yaml")
    with pytest.raises(FishmergeError, match="not valid YAML"):
        load_merge_config(write(tmp_path, "models: [\n"))


def test_sizes() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(123) == 123


def test_pipeline_fisher_specs_follow_the_execution_device_and_the_fisher_options(
    model_dirs, csv_data, tmp_path
) -> None:
    """The pipeline's Fishers are computed as the config says: `execution.device` (a GPU host with
    `device: cpu` computes on the CPU), and the fisher block's dtype, max_memory and fallback (which
    the config used to refuse and the specs dropped); the store records what was used."""
    from fishmerge.fisher.job import FisherSpec, compute_shard, finish, resolve
    from fishmerge.fisher.shards import plan_shards
    from fishmerge.fisher.store import open_fisher_store
    from fishmerge.merge.config import fisher_specs

    path = write(
        tmp_path,
        f"""
name: dev
method: fisher
models:
  - {{name: a, path: {model_dirs["bert-cls"]}, data: {{path: {csv_data}, text_fields: [text]}}}}
  - {{name: b, path: {model_dirs["bert-cls"]}, data: {{path: {csv_data}, text_fields: [text]}}}}
fisher: {{estimator: sampled, examples: 4, batch_size: 2, max_length: 16, dtype: bfloat16, max_memory: 64MB, fallback: error}}
output: {tmp_path / "out"}
execution: {{device: cpu}}
""",
    )
    spec = fisher_specs(load_merge_config(path))["a"]
    assert (spec["device"], spec["dtype"], spec["max_memory"], spec["fallback"]) == (
        "cpu",
        "bfloat16",
        64 * 10**6,
        "error",
    )
    r = resolve(FisherSpec(**spec), store_root=str(tmp_path / "fishers"))
    plan = plan_shards(len(r.indices), 1)
    attrs = dict(open_fisher_store(finish(r, plan, [compute_shard(r, s) for s in plan], 1.0)).attrs)
    assert attrs["device"] == "cpu" and attrs["model_dtype"] == "bfloat16", attrs


def test_baselines_name_references_and_merge_methods(tmp_path) -> None:
    """evaluate.baselines takes the references and any registered merge method, in the order given; the
    merge's own method is not compared with itself, and the methods compared add their statistics."""
    text = GOOD + "evaluate: {baselines: [ties, originals, fisher, regmean, ensemble]}\n"
    cfg = load_merge_config(write(tmp_path, text))
    assert cfg.evaluate.methods == ["ties", "fisher", "regmean"]
    assert cfg.merge_methods == ["fisher", "ties", "regmean"]
    assert cfg.estimated_statistics() == ["fisher", "gram"]  # regmean, compared, reads Grams


@pytest.mark.parametrize(
    ("baselines", "message"),
    [
        ("[isotropc]", "unknown baseline(s) ['isotropc']: choose from originals, ensemble, fisher, isotropic"),
        ("[ties, ties]", "baselines named twice: ['ties']"),
    ],
)
def test_bad_baselines_are_one_line_each(tmp_path, baselines, message) -> None:
    with pytest.raises(FishmergeError, match=re.escape(message)):
        load_merge_config(write(tmp_path, GOOD + f"evaluate: {{baselines: {baselines}}}\n"))


def test_a_compared_method_needing_a_base_is_refused_without_one(tmp_path) -> None:
    text = GOOD.replace("base: ./models/pretrained\n", "") + "evaluate: {baselines: [task_arithmetic]}\n"
    with pytest.raises(FishmergeError, match=re.escape("baseline 'task_arithmetic' needs `base:`")):
        load_merge_config(write(tmp_path, text))


def test_with_params_sets_a_methods_own_parameters_only(tmp_path) -> None:
    cfg = load_merge_config(write(tmp_path, GOOD))
    ties = cfg.with_params("ties", {"density": 0.4, "scale": 1.5})
    assert (ties.method_params("ties").density, ties.method_params("ties").scale) == (0.4, 1.5)
    assert cfg.method_params("ties").density == 0.2  # the config itself is left as it is
    regmean = cfg.with_params("regmean", {"alpha": 0.5, "floor": 0.5})  # floor is fisher's, borrowed
    assert regmean.method_params("regmean").alpha == 0.5 and regmean.fisher.floor == cfg.fisher.floor
