"""fishmerge.registry on a real MLflow (SQLite store in tmp_path, artifacts beside it)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from fishmerge.errors import FishmergeError
from fishmerge.registry import (
    apply_promotion,
    check_reachable,
    decide_promotion,
    download_model_dir,
    history,
    promote,
    register_model_dir,
    tracking_uri,
    use_experiment,
)
from fishmerge.registry.registration import DOWNLOAD_MARKER, resolve_model_uri
from mlflow import MlflowClient

from tests.conftest import SPECIAL, WORDS, save_model_dir

NAME = "fm-test"
POLICY = {"metric": "accuracy", "min_delta": 0.01, "guard": {"mnli/accuracy": -0.01}}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database (migrations take seconds; each test gets a copy)."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory) -> Path:
    """Tiny BERT classifier (id2label neg/pos) with a word-level tokenizer that knows its words."""
    from transformers import BertTokenizer

    d = save_model_dir(tmp_path_factory.mktemp("reg-models") / "bert-cls2", "bert-cls2", seed=3)
    BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}).save_pretrained(d)
    return d


@pytest.fixture
def store(tmp_path, monkeypatch, template_db) -> str:
    """A fresh tracking store in tmp_path; env MLFLOW_TRACKING_URI cannot leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_experiment("fishmerge-tests", uri)
    return uri


def register(model_dir: Path, lineage: str, tags: dict | None = None) -> tuple[str, bool]:
    run = MlflowClient().create_run(mlflow.get_experiment_by_name("fishmerge-tests").experiment_id)
    return register_model_dir(model_dir, NAME, run.info.run_id, lineage, tags or {})


def aliases() -> dict[str, str]:
    return {a: str(v) for a, v in MlflowClient().get_registered_model(NAME).aliases.items()}


def test_tracking_uri_precedence(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == "sqlite:///mlflow.db"
    assert tracking_uri("http://h:5000") == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert tracking_uri("http://h:5000") == "sqlite:////tmp/x.db"


def test_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(FishmergeError, match=r"http://127\.0\.0\.1:9 is unreachable.*MLFLOW_TRACKING_URI"):
        check_reachable("http://127.0.0.1:9", retries=2, backoff_s=0.05, timeout_s=1.0)


def test_sqlite_folder_is_created_and_checked(tmp_path) -> None:
    check_reachable(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(FishmergeError, match="not writable"):
        check_reachable(f"sqlite:///{tmp_path}/file/mlflow.db")


def test_decide_promotion_rules() -> None:
    champ = {"accuracy": 0.80, "mnli/accuracy": 0.70}
    assert decide_promotion({"accuracy": 0.5, "mnli/accuracy": 0.1}, None, "accuracy", 0.01, POLICY["guard"])[0]
    ok, reason = decide_promotion({"accuracy": 0.82, "mnli/accuracy": 0.695}, champ, "accuracy", 0.01, POLICY["guard"])
    assert ok and "0.82" in reason and "0.8" in reason
    ok, reason = decide_promotion({"accuracy": 0.805, "mnli/accuracy": 0.9}, champ, "accuracy", 0.01, POLICY["guard"])
    assert not ok and "0.805 vs champion 0.8: better by +0.005 < min_delta 0.01 (higher is better)" in reason
    ok, reason = decide_promotion({"accuracy": 0.9, "mnli/accuracy": 0.68}, champ, "accuracy", 0.01, POLICY["guard"])
    assert not ok and "guard mnli/accuracy broken" in reason and "-0.02" in reason
    assert decide_promotion({"accuracy": 0.8}, {"accuracy": 0.8}, "accuracy", 0.0, {})[0]  # ties promote at delta 0
    with pytest.raises(FishmergeError, match=r"new model's metrics lack \['f1'\]"):
        decide_promotion({"accuracy": 0.9}, champ, "f1", 0.0, {})
    with pytest.raises(FishmergeError, match=r"champion's metrics lack \['qnli/accuracy'\]"):
        decide_promotion({"accuracy": 0.9, "qnli/accuracy": 0.5}, champ, "accuracy", 0.0, {"qnli/accuracy": -0.1})


def test_decide_promotion_by_a_lower_is_better_metric() -> None:
    """nll/perplexity: min_delta means "lower by", a guard's tolerance an allowed rise; each case on its own."""
    champ = {"lm/nll": 2.50, "code/nll": 3.00, "lm/perplexity": 12.18}
    guard = {"code/nll": -0.05}  # code's NLL may rise by up to 0.05
    ok, reason = decide_promotion(
        {"lm/nll": 2.40, "code/nll": 3.04, "lm/perplexity": 11.0}, champ, "lm/nll", 0.05, guard
    )
    assert ok and "better by +0.1 ≥ min_delta 0.05 (lower is better)" in reason and "code/nll better by -0.04" in reason
    ok, reason = decide_promotion(
        {"lm/nll": 2.48, "code/nll": 2.0, "lm/perplexity": 11.9}, champ, "lm/nll", 0.05, guard
    )
    assert not ok and "better by +0.02 < min_delta 0.05 (lower is better)" in reason  # lower, not lower enough
    ok, reason = decide_promotion({"lm/nll": 2.60, "code/nll": 2.0, "lm/perplexity": 13.5}, champ, "lm/nll", 0.0, {})
    assert not ok and "better by -0.1" in reason  # a higher NLL is worse, whatever a higher accuracy would be
    ok, reason = decide_promotion({"lm/nll": 2.0, "code/nll": 3.10, "lm/perplexity": 7.4}, champ, "lm/nll", 0.0, guard)
    assert not ok and "guard code/nll broken" in reason and "-0.1" in reason
    assert decide_promotion({"lm/perplexity": 12.0}, champ, "lm/perplexity")[0]  # perplexity: lower wins too
    user = {"lm/my_scorers.rate": 0.2}
    with pytest.raises(FishmergeError, match="cannot tell whether a higher or a lower 'lm/my_scorers.rate'"):
        decide_promotion(user, {"lm/my_scorers.rate": 0.3}, "lm/my_scorers.rate")
    assert decide_promotion(
        user, {"lm/my_scorers.rate": 0.3}, "lm/my_scorers.rate", directions={"my_scorers.rate": False}
    )[0]


def test_register_dedupes_by_lineage_and_keeps_artifacts_beside_the_db(store, cls_dir, tmp_path) -> None:
    v1, created = register(cls_dir, "lineage-a", {"fishmerge.method": "fisher"})
    assert (v1, created) == ("1", True)
    assert aliases() == {"challenger": "1"}
    assert register(cls_dir, "lineage-a") == ("1", False)
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1
    v2, created = register(cls_dir, "lineage-b")
    assert (v2, created) == ("2", True) and aliases() == {"challenger": "2"}
    mv = MlflowClient().get_model_version(NAME, "1")
    assert mv.tags["fishmerge.method"] == "fisher" and mv.tags["fishmerge.lineage"] == "lineage-a"
    stored = list((tmp_path / "mlartifacts").rglob("model.safetensors"))
    assert len(stored) == 2  # both versions' weights, inside tmp_path beside mlflow.db
    assert not Path("mlruns").exists()


def test_promotion_sequence(store, cls_dir) -> None:
    versions = [register(cls_dir, f"lineage-{i}")[0] for i in range(4)]
    first = apply_promotion(NAME, versions[0], {"accuracy": 0.80, "mnli/accuracy": 0.70}, POLICY)
    assert first["promoted"] and first["champion_before"] is None and "no champion" in first["reason"]
    better = apply_promotion(NAME, versions[1], {"accuracy": 0.85, "mnli/accuracy": 0.695}, POLICY)
    assert better["promoted"] and better["champion_before"] == "1" and aliases()["champion"] == "2"
    worse = apply_promotion(NAME, versions[2], {"accuracy": 0.855, "mnli/accuracy": 0.80}, POLICY)
    assert not worse["promoted"] and aliases()["champion"] == "2"
    tags = MlflowClient().get_model_version(NAME, "3").tags
    assert (
        tags["fishmerge.decision"] == "rejected"
        and "0.855 vs champion 0.85: better by +0.005 < min_delta 0.01" in tags["fishmerge.reason"]
    )
    assert tags["fishmerge.champion_before"] == "2" and float(tags["metric.accuracy"]) == 0.855
    guard = apply_promotion(NAME, versions[3], {"accuracy": 0.95, "mnli/accuracy": 0.60}, POLICY)
    assert not guard["promoted"] and "guard mnli/accuracy broken" in guard["reason"] and aliases()["champion"] == "2"
    again = apply_promotion(NAME, "2", {"accuracy": 0.85, "mnli/accuracy": 0.695}, POLICY)
    assert again["decision"] == "already_champion" and aliases()["champion"] == "2"


def test_promote_by_hand_and_history(store, cls_dir) -> None:
    for i in range(3):
        register(cls_dir, f"lineage-{i}")
    apply_promotion(NAME, "1", {"accuracy": 0.8, "mnli/accuracy": 0.7}, POLICY)
    apply_promotion(NAME, "2", {"accuracy": 0.7, "mnli/accuracy": 0.7}, POLICY)
    assert promote(NAME, "2")["champion_before"] == "1"
    assert aliases() == {"champion": "2", "challenger": "3"}
    assert promote(NAME)["version"] == "3" and aliases()["champion"] == "3"  # default: the challenger
    rows = history(NAME)
    assert [r["version"] for r in rows] == ["3", "2", "1"]
    assert rows[0]["aliases"] == ["challenger", "champion"] and rows[1]["aliases"] == [] and rows[2]["aliases"] == []
    assert rows[1]["metrics"] == {"accuracy": 0.7, "mnli/accuracy": 0.7} and rows[1]["decision"] == "promoted_by_hand"
    assert rows[2]["lineage"] == "lineage-0" and rows[2]["run_id"] and rows[2]["created"].endswith("+00:00")
    with pytest.raises(FishmergeError, match="no registered model 'nope'"):
        history("nope")
    with pytest.raises(FishmergeError, match="has no version 9"):
        promote(NAME, 9)


def oracle_labels(model_dir: Path, texts: list[str]) -> list[str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return [model.config.id2label[int(model(**tok(t, return_tensors="pt")).logits.argmax())] for t in texts]


TEXTS = [" ".join(WORDS[i : i + k]) for i, k in [(0, 3), (10, 7), (30, 2), (45, 9), (60, 5), (80, 4), (5, 1)]]


def test_pyfunc_predicts_label_names_and_downloads_as_hf(store, cls_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    register(cls_dir, "lineage-a")
    want = oracle_labels(cls_dir, TEXTS)
    assert set(want) <= {"neg", "pos"}
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    assert list(model.predict(pd.DataFrame({"text": TEXTS}))) == want
    assert list(model.predict(TEXTS)) == want
    pairs = model.predict(pd.DataFrame({"text": TEXTS, "text_b": TEXTS[::-1]}))
    assert set(pairs) <= {"neg", "pos"} and len(pairs) == len(TEXTS)

    hf = download_model_dir(NAME, "challenger", tmp_path / "dl")
    assert hf.is_relative_to(tmp_path / "dl") and (hf / "model.safetensors").exists()
    got = AutoModelForSequenceClassification.from_pretrained(hf).state_dict()
    orig = AutoModelForSequenceClassification.from_pretrained(cls_dir).state_dict()
    assert all(torch.equal(got[k], orig[k]) for k in orig)
    assert download_model_dir(NAME, 1, tmp_path / "dl1").name == hf.name
    with pytest.raises(FishmergeError, match="cannot download"):
        download_model_dir(NAME, "champion", tmp_path / "dl2")


@pytest.fixture(scope="module")
def sharded_dir(cls_dir, tmp_path_factory) -> Path:
    """The same classifier saved as a sharded checkpoint (model-0000x-of-0000y.safetensors + index), in a
    folder of the same name (as a pipeline's `<output>/<target>` is, version after version)."""
    from transformers import AutoModelForSequenceClassification

    d = tmp_path_factory.mktemp("reg-sharded") / cls_dir.name
    shutil.copytree(cls_dir, d)
    (d / "model.safetensors").unlink()
    AutoModelForSequenceClassification.from_pretrained(cls_dir).save_pretrained(d, max_shard_size="40KB")
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").exists()
    return d


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def same_weights(hf: Path, orig: Path) -> bool:
    from transformers import AutoModelForSequenceClassification

    got = AutoModelForSequenceClassification.from_pretrained(hf).state_dict()
    want = AutoModelForSequenceClassification.from_pretrained(orig).state_dict()
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_downloading_another_version_into_the_same_folder_leaves_no_stale_file(
    store, cls_dir, sharded_dir, tmp_path
) -> None:
    """A download into a folder that holds an earlier download replaces it whole: before, version 1's
    shards and index stayed beside version 2's single file (and the old index was read)."""
    register(sharded_dir, "lineage-sharded")  # version 1: shards + index
    register(cls_dir, "lineage-single")  # version 2: one model.safetensors
    dst = tmp_path / "dl"
    hf = download_model_dir(NAME, 1, dst)
    assert files(hf) == files(sharded_dir)
    hf = download_model_dir(NAME, "challenger", dst)  # version 2, same folder
    assert files(hf) == files(cls_dir) and same_weights(hf, cls_dir)
    hf = download_model_dir(NAME, 1, dst)
    assert files(hf) == files(sharded_dir) and same_weights(hf, sharded_dir)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dl")) == []  # nothing left aside

    mine = tmp_path / "mine"  # a folder fishmerge did not write is never replaced
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FishmergeError, match="never replaced"):
        download_model_dir(NAME, 1, mine)
    assert files(mine) == ["notes.txt"]


def test_a_moved_alias_resolves_to_exactly_the_new_versions_files(store, cls_dir, sharded_dir, tmp_path) -> None:
    """models:/Name@alias: each version in its own folder, so a moved alias never reads a mix of two
    versions' files (stale shards, an old index)."""
    register(cls_dir, "lineage-single")  # version 1: one model.safetensors
    register(sharded_dir, "lineage-sharded")  # version 2: shards + index
    client = MlflowClient()
    root = tmp_path / "registry"
    uri = f"models:/{NAME}@champion"
    client.set_registered_model_alias(NAME, "champion", "1")
    first = Path(resolve_model_uri(uri, root))
    assert files(first) == files(cls_dir) and same_weights(first, cls_dir)

    client.set_registered_model_alias(NAME, "champion", "2")
    second = Path(resolve_model_uri(uri, root))
    assert second != first and files(second) == files(sharded_dir) and same_weights(second, sharded_dir)
    assert files(first) == files(cls_dir)  # version 1's folder is untouched (another run may be reading it)

    client.set_registered_model_alias(NAME, "champion", "1")
    assert Path(resolve_model_uri(uri, root)) == first and files(first) == files(cls_dir)  # reused, no stale index
    assert Path(resolve_model_uri(f"models:/{NAME}/2", root)) == second
    for folder in (first, second):
        marker = next(p for p in folder.parents if (p / DOWNLOAD_MARKER).exists())
        assert marker.parent == root / NAME
    assert not [p for p in (root / NAME).iterdir() if ".download-" in p.name]
    with pytest.raises(FishmergeError, match="cannot download models:/fm-test@nope"):
        resolve_model_uri(f"models:/{NAME}@nope", root)


def test_logged_model_loads_without_fishmerge(store, cls_dir, monkeypatch) -> None:
    """The pyfunc is pickled by value: with fishmerge unimportable, it still loads and predicts."""
    register(cls_dir, "lineage-a")
    want = oracle_labels(cls_dir, TEXTS)
    for mod in [m for m in sys.modules if m == "fishmerge" or m.startswith("fishmerge.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # any `import fishmerge...` now raises ImportError
    with pytest.raises(ImportError):
        __import__("fishmerge.registry.pyfunc")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    assert list(model.predict(TEXTS)) == want


def test_bad_model_dir(store, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FishmergeError, match="no .safetensors weights"):
        register(tmp_path / "empty", "x")


def test_non_finite_metrics_are_never_promoted() -> None:
    ok, reason = decide_promotion({"lm/nll": float("nan")}, {"lm/nll": 2.0}, "lm/nll")
    assert not ok and "not finite" in reason
    assert decide_promotion({"lm/nll": 2.0}, {"lm/nll": float("inf")}, "lm/nll")[0]  # any finite NLL beats Inf
    ok, reason = decide_promotion({"lm/nll": 2.0}, {"lm/nll": float("nan")}, "lm/nll")
    assert ok and "champion's lm/nll is NaN" in reason
