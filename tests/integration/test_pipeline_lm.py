"""`fishmerge run` on causal LMs: two tiny tied Llamas fine-tuned from one body on two "domains"
(prompt → response over disjoint word ranges), sampled Fishers on the responses only, λ search on
validation NLL (lower is better), the out-of-core merge, evaluation against the originals, isotropic
merging and output ensembling, MLflow registration with a pyfunc that generates text, promotion by
NLL, an idempotent rerun; and bad LM input refused in one line with nothing registered.

The search is checked against a brute force written here: the Fisher merge in numpy (float64) and
the NLL by a plain per-example loop that masks the prompt by hand; the ensemble's NLL by hand.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from fishmerge.flows.cli import main
from fishmerge.flows.pipeline import run_pipeline
from mlflow import MlflowClient

from tests.conftest import WORDS, save_model_dir
from tests.integration.conftest import pipeline_workspace

DOMAINS = {"a": (10, 40), "b": (50, 85)}  # each domain's responses draw from its own word range
PROMPT = "w1 w2"
MAX_LENGTH = 14
SEARCH_LIMIT = 10
FLOOR = 1e-6


def domain_rows(n: int, lo: int, hi: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": PROMPT, "response": " ".join(WORDS[rng.randrange(lo, hi)] for _ in range(rng.randint(3, 8)))}
        for _ in range(n)
    ]


def hand_tokens(tok, row: dict) -> tuple[list[int], int]:
    """Prompt with special tokens, response without (written out, not fishmerge's encoder)."""
    prompt = tok(row["prompt"])["input_ids"]
    return (prompt + tok(row["response"], add_special_tokens=False)["input_ids"])[:MAX_LENGTH], len(prompt)


def finetune(model_dir: Path, rows: list[dict], seed: int, steps: int = 25) -> None:
    """Full-batch Adam on the response tokens only, saved over the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = [hand_tokens(tok, r) for r in rows]
    ids = torch.zeros(len(rows), MAX_LENGTH, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (s, start) in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels[i, start : len(s)] = torch.tensor(s[start:])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(model_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("pipeline-lm")
    with pipeline_workspace(root):
        for i, (name, (lo, hi)) in enumerate(DOMAINS.items()):
            rows = domain_rows(60, lo, hi, seed=20 + i)
            d = save_model_dir(root / name, "llama-lm-tied", seed=0)  # one "pretrained" body, two fine-tunings
            finetune(d, rows[:30], seed=i + 1)
            ds = datasets.Dataset.from_list
            datasets.DatasetDict(
                {"train": ds(rows[:30]), "validation": ds(rows[30:45]), "test": ds(rows[45:])}
            ).save_to_disk(str(root / f"data-{name}"))
        yield root


def write_config(ws: Path, file: str, uri: str, register: str = "fm-lm", **changes) -> Path:
    cfg: dict = {
        "name": "fm-lm",
        "method": "fisher",
        "models": [
            {
                "name": n,
                "path": n,
                "data": {"path": f"data-{n}", "text_fields": ["prompt", "response"], "eval_split": "test"},
            }
            for n in DOMAINS
        ],
        "fisher": {"examples": 12, "max_length": MAX_LENGTH, "store_root": "fishers"},  # estimator: auto → sampled
        "output": f"out-{register}",
        "search": {"points": 3, "limit": SEARCH_LIMIT},  # metric: nll (the LM default)
        "evaluate": {"max_length": MAX_LENGTH, "batch_size": 8},  # metrics: nll, perplexity
        "register": {"name": register, "promote": {"metric": "a/nll", "guard": {"b/nll": -0.5}}},
        "mlflow": {"tracking_uri": uri, "experiment": "fm-lm-tests"},
    }
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section][sub] = value
        else:
            cfg[section] = value
    path = ws / file
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def first(ws):
    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    cfg = write_config(ws, "lm.yaml", uri)
    return {"cfg": cfg, "uri": uri, "result": run_pipeline(str(cfg))}


# --- the brute force ---------------------------------------------------------------------------------


def response_logprobs(model, tok, rows: list[dict]) -> list[float]:
    """log p of every response token, one unpadded example at a time."""
    out = []
    with torch.no_grad():
        for row in rows:
            ids, start = hand_tokens(tok, row)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            out += [float(logp[t - 1, ids[t]]) for t in range(max(start, 1), len(ids))]
    return out


def split_rows(ws: Path, name: str, split: str, limit: int) -> list[dict]:
    import datasets

    rows = datasets.load_from_disk(str(ws / f"data-{name}"))[split]
    return [rows[i] for i in range(min(limit, len(rows)))]


def with_state(ws: Path, name: str, state: dict[str, np.ndarray]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ws / name).eval()
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(torch.from_numpy(v.astype(np.float32)))
    return model


def brute_force(ws: Path, fishers: dict[str, str]) -> list[dict]:
    """Every grid λ: the Fisher merge in numpy (favor_target floor), NLL by the per-example loop."""
    import zarr
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    names = list(DOMAINS)
    thetas = [load_file(str(ws / n / "model.safetensors")) for n in names]
    keys = list(thetas[0])
    fish = [{k: np.asarray(zarr.open_group(fishers[n], mode="r")[k][...], np.float64) for k in keys} for n in names]
    tok = AutoTokenizer.from_pretrained(ws / "a")
    out = []
    for w in (0.0, 0.5, 1.0):
        lam = [w, 1.0 - w]
        per_task = {}
        for t, target in enumerate(names):
            state = {}
            for k in keys:
                ft = [np.maximum(f[k], FLOOR) if i == t else f[k] for i, f in enumerate(fish)]
                num = sum(lam[i] * ft[i] * thetas[i][k].astype(np.float64) for i in range(2))
                den = sum(lam[i] * ft[i] for i in range(2))
                state[k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), thetas[t][k])
            values = response_logprobs(
                with_state(ws, target, state), tok, split_rows(ws, target, "validation", SEARCH_LIMIT)
            )
            per_task[target] = -float(np.mean(values))
        out.append({"weights": lam, "score": float(np.mean(list(per_task.values()))), "per_task": per_task})
    return out


def test_lm_search_equals_the_brute_force(ws, first) -> None:
    result = first["result"]
    ref = brute_force(ws, result["fishers"])
    scores = [c["score"] for c in ref]
    assert len({round(s, 6) for s in scores}) == 3, f"candidates score {scores}: the test would be weak"
    best = int(np.argmin(scores))  # lower NLL is better
    assert [result["weights"][n] for n in DOMAINS] == pytest.approx(ref[best]["weights"], abs=1e-9)
    pipeline = json.loads((Path(result["output"]) / "pipeline.json").read_text())
    found = pipeline["searches"]["fisher"]
    assert found["metric"] == "nll" and found["higher_is_better"] is False and found["best"] == best
    for c, r in zip(found["candidates"], ref):
        assert c["weights"] == pytest.approx(r["weights"], abs=1e-12)
        assert c["score"] == pytest.approx(r["score"], rel=2e-5)
        assert c["per_task"] == pytest.approx(r["per_task"], rel=2e-5)
    stores = {n: json.loads((Path(u) / "zarr.json").read_text())["attributes"] for n, u in result["fishers"].items()}
    assert {a["estimator"] for a in stores.values()} == {"sampled"}  # `auto` for a causal LM


def test_lm_evaluation_originals_and_ensemble_by_hand(ws, first) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = first["result"]["results"]
    tok = AutoTokenizer.from_pretrained(ws / "a")
    models = [AutoModelForCausalLM.from_pretrained(ws / n).eval() for n in DOMAINS]
    for target in DOMAINS:
        rows = split_rows(ws, target, "test", 10**6)
        per_model = [np.asarray(response_logprobs(m, tok, rows)) for m in models]
        own = per_model[list(DOMAINS).index(target)]
        assert results["originals"][f"{target}/nll"] == pytest.approx(-own.mean(), rel=2e-5)
        assert results["originals"][f"{target}/perplexity"] == pytest.approx(np.exp(-own.mean()), rel=2e-5)
        ensemble = -float(np.mean(np.log(np.mean([np.exp(v) for v in per_model], axis=0))))
        assert results["ensemble"][f"{target}/nll"] == pytest.approx(ensemble, rel=2e-5)
        for kind in ("merged", "isotropic"):
            assert np.isfinite(results[kind][f"{target}/nll"])
    # each domain's own model fits its domain better than the other's: the tasks were learnt
    other = np.asarray(response_logprobs(models[1], tok, split_rows(ws, "a", "test", 10**6)))
    assert results["originals"]["a/nll"] < -other.mean()


def test_lm_registered_served_and_rerun_registers_nothing(ws, first, capsys) -> None:
    from fishmerge.registry.registration import resolve_model_uri
    from transformers import AutoModelForCausalLM

    uri, result = first["uri"], first["result"]
    client = MlflowClient(uri)
    for name in ("fm-lm-a", "fm-lm-b"):
        assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {
            "champion": "1",
            "challenger": "1",
        }
        assert result["decisions"][name]["decision"] == "promoted"
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/fm-lm-a@champion").predict(["w1 w2", "w3"])
    assert len(served) == 2 and all(isinstance(s, str) and s.strip() for s in served)
    folder = resolve_model_uri("models:/fm-lm-a@champion", ws / "downloads")
    model = AutoModelForCausalLM.from_pretrained(folder)  # a plain HF folder
    assert type(model).__name__ == "LlamaForCausalLM"
    run = client.get_run(result["run_id"])
    assert run.data.metrics["a/nll"] == result["results"]["merged"]["a/nll"]
    assert "ensemble/a/perplexity" in run.data.metrics

    report = (Path(result["output"]) / "report.md").read_text()
    assert "| a/nll ↓ |" in report and "| nll ↓ |" in report and "lower is better" in report
    row = next(line for line in report.splitlines() if line.startswith("| a/nll ↓ |"))
    best = min(v["a/nll"] for v in result["results"].values() if "a/nll" in v)
    assert f"**{best:.4f}**" in row  # the lowest NLL of the row is the one in bold

    capsys.readouterr()
    assert main(["run", str(first["cfg"]), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fm-lm-a: version 1 unchanged" in err and "fm-lm-b: version 1 unchanged" in err
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'fm-lm-a'")) == ["1"]


def test_lm_promotion_by_nll_rejects_a_worse_merge(ws, first) -> None:
    """A second config whose λ is fixed at the worse end for task a: its merge must not become champion."""
    result = first["result"]
    worst = max((0.0, 1.0), key=lambda w: abs(w - result["weights"]["a"]))
    cfg = write_config(ws, "lm-worse.yaml", first["uri"], search=None)
    data = json.loads(cfg.read_text())
    data["models"][0]["weight"], data["models"][1]["weight"] = worst + 1e-9, 1.0 - worst + 1e-9
    data["output"] = "out-fm-lm-worse"
    cfg.write_text(json.dumps(data))
    again = run_pipeline(str(cfg))
    decision = again["decisions"]["fm-lm-a"]
    new, old = again["results"]["merged"]["a/nll"], result["results"]["merged"]["a/nll"]
    if new > old:
        assert decision["decision"] == "rejected" and "lower is better" in decision["reason"]
        client = MlflowClient(first["uri"])
        assert str(client.get_registered_model("fm-lm-a").aliases["champion"]) == "1"
    else:  # the fixed λ happened to fit task a better: then it must have been promoted
        assert decision["decision"] == "promoted"


# --- bad input ---------------------------------------------------------------------------------------

SCORERS = """
import math
from fishmerge.pipeline.metrics import scorer

@scorer("higher")
def raises(model, tokenizer, rows):
    raise RuntimeError("no GPU for my judge")

@scorer("higher")
def nan(model, tokenizer, rows):
    return math.nan

def undirected(model, tokenizer, rows):
    return 1.0

@scorer("higher")
def length(model, tokenizer, rows):
    return float(sum(len(r["response"]) for r in rows))
"""


@pytest.fixture(scope="module")
def scorers(ws):
    (ws / "lm_scorers.py").write_text(SCORERS)
    import sys

    sys.path.insert(0, str(ws))
    yield
    sys.path.remove(str(ws))


@pytest.mark.parametrize(
    ("case", "changes", "message"),
    [
        ("exact", {"fisher__estimator": "exact"}, "'exact' over a causal LM's vocabulary is intractable"),
        ("classifier-metric", {"search__metric": "accuracy"}, "search.metric 'accuracy' scores classifiers"),
        ("no-response", {"missing": True}, "column(s) ['answer'] not in the data"),
        ("raises", {"search__metric": "lm_scorers:raises"}, "scorer 'lm_scorers:raises' raised RuntimeError"),
        ("nan", {"search__metric": "lm_scorers:nan"}, "scorer 'lm_scorers:nan' returned nan"),
        ("undirected", {"search__metric": "lm_scorers:undirected"}, "does not declare its direction"),
        ("no-module", {"search__metric": "no_such_mod:f"}, "cannot import module 'no_such_mod'"),
    ],
)
def test_bad_lm_input_one_line_nothing_registered(ws, scorers, capsys, case, changes, message) -> None:
    uri = f"sqlite:///{ws / 'mlflow-bad' / 'mlflow.db'}"
    missing = changes.pop("missing", False)
    cfg = write_config(ws, f"bad-{case}.yaml", uri, register=f"bad-{case}", **changes)
    if missing:
        data = json.loads(cfg.read_text())
        data["models"][1]["data"]["text_fields"] = ["prompt", "answer"]
        cfg.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fishmerge: error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (ws / f"out-bad-{case}").exists()
    assert not [m for m in MlflowClient(uri).search_registered_models() if m.name.startswith(f"bad-{case}")]


def test_classifier_config_with_an_lm_metric_is_refused(ws, capsys, model_dirs, csv_data) -> None:
    cfg = {
        "name": "cls-ppl",
        "method": "isotropic",
        "models": [
            {"name": n, "path": str(model_dirs["bert-cls"]), "data": {"path": str(csv_data), "eval_split": "train"}}
            for n in ("x", "y")
        ],
        "output": "out-cls-ppl",
        "search": {"points": 2, "metric": "perplexity", "split": "train"},
        "mlflow": {"tracking_uri": f"sqlite:///{ws / 'mlflow-bad' / 'mlflow.db'}"},
    }
    path = ws / "cls-ppl.yaml"
    path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fishmerge: error:")]
    assert len(err) == 1 and "search.metric 'perplexity' scores causal LMs, but target 'x' is a classifier" in err[0]


def test_user_scorer_is_searched_by_its_direction(ws, scorers, first) -> None:
    """A scorer of the user's: called with (model, tokenizer, rows), searched by its declared direction."""
    cfg = write_config(
        ws,
        "lm-user.yaml",
        first["uri"],
        register="fm-lm-user",
        search={"points": 2, "limit": 4, "metric": "lm_scorers:length"},
        evaluate={"max_length": MAX_LENGTH, "batch_size": 8, "metrics": ["nll", "lm_scorers:length"], "limit": 4},
    )
    data = json.loads(cfg.read_text())
    data["register"]["promote"] = {"metric": "a/lm_scorers:length"}
    cfg.write_text(json.dumps(data))
    result = run_pipeline(str(cfg))
    rows = split_rows(ws, "a", "test", 4)
    assert result["results"]["merged"]["a/lm_scorers.length"] == float(sum(len(r["response"]) for r in rows))
    assert "a/lm_scorers.length" not in result["results"]["ensemble"]  # a scorer needs one model
    assert result["decisions"]["fm-lm-user-a"]["decision"] == "promoted"


def test_chat_data_without_a_chat_template_is_refused_before_any_work(ws, capsys) -> None:
    import datasets

    chats = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in domain_rows(6, 10, 40, seed=7)
    ]
    ds = datasets.Dataset.from_list
    datasets.DatasetDict({"train": ds(chats), "validation": ds(chats), "test": ds(chats)}).save_to_disk(
        str(ws / "data-chat")
    )
    uri = f"sqlite:///{ws / 'mlflow-bad' / 'mlflow.db'}"
    cfg = write_config(ws, "bad-chat.yaml", uri, register="bad-chat")
    data = json.loads(cfg.read_text())
    data["models"][0]["data"] = {"path": "data-chat", "messages_field": "messages", "eval_split": "test"}
    cfg.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fishmerge: error:")]
    assert len(err) == 1 and "the tokenizer has no chat template" in err[0], err
    assert not [m for m in MlflowClient(uri).search_registered_models() if m.name.startswith("bad-chat")]
