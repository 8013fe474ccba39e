"""Text datasets for Fisher estimation: load, select N examples deterministically, tokenize, batch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fishmerge.errors import FishmergeError

IGNORE_INDEX = -100  # a label position that does not count (Hugging Face's convention)
FILE_LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_split(path: str | Path, split: str = "train"):
    """A `datasets.Dataset` from a save_to_disk folder or a .csv/.json/.jsonl/.parquet file."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FishmergeError(f"data path '{p}' does not exist")
    if p.is_dir():
        try:
            data = datasets.load_from_disk(str(p))
        except FileNotFoundError as exc:
            raise FishmergeError(f"'{p}' is not a datasets.save_to_disk folder: {exc}") from exc
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise FishmergeError(f"split '{split}' not in '{p}': it has {', '.join(data)}")
            return data[split]
        return data
    loader = FILE_LOADERS.get(p.suffix.lower())
    if loader is None:
        raise FishmergeError(f"cannot read '{p}': use a save_to_disk folder or a {'/'.join(FILE_LOADERS)} file")
    if split != "train":
        raise FishmergeError(f"a single file has only the split 'train', not '{split}'")
    try:
        return datasets.load_dataset(loader, data_files=str(p), split="train")
    except ValueError as exc:
        if "corresponds to no data" in str(exc):
            raise FishmergeError(f"the data file '{p}' is empty: nothing to estimate a Fisher on") from exc
        raise FishmergeError(f"cannot read '{p}' as {loader}: {exc}") from exc
    except Exception as exc:  # pyarrow / json parse errors come in many types
        raise FishmergeError(f"cannot read '{p}' as {loader}: {exc}") from exc


def select_indices(n_rows: int, n_examples: int | None, seed: int) -> list[int]:
    """N row indices chosen by `seed` (sorted); all rows when N is None or ≥ the split's size."""
    if n_rows == 0:
        raise FishmergeError("the dataset split is empty: nothing to estimate a Fisher on")
    if n_examples is not None and n_examples <= 0:
        raise FishmergeError(f"--examples must be positive, got {n_examples}")
    if n_examples is None or n_examples >= n_rows:
        return list(range(n_rows))
    return sorted(np.random.default_rng(seed).permutation(n_rows)[:n_examples].tolist())


def column_values(rows, fields: Sequence[str]) -> dict[str, list]:
    """The rows' fields as plain lists, read in one slice: indexing a `datasets` column row by row
    reads a table slice per row (0.1 ms each, measured: most of fingerprinting 3200 rows)."""
    names = list(dict.fromkeys(fields))
    if len(rows) == 0:
        return {f: [] for f in names}
    return rows.select_columns(names)[: len(rows)]


def check_columns(columns: Sequence[str], wanted: Sequence[str], what: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise FishmergeError(f"{what} column(s) {missing} not in the data: it has {', '.join(columns)}")


BATCH_COST_TOKENS = 64
"""What one more batch costs on CPU, in padded tokens: `length_batches` cuts where a batch would pad more
than this. Measured on CPU (MiniLM-L6, the demo's 500 Debate validation rows, batch size 64, last layer for
[CLS] only): 1.15x faster than equal batches of 64, 1.04x faster than equal batches of 32
(docs/benchmarks.md). Not measured on GPUs, where a batch costs far more: there the cut keeps the fewest
batches (`batch_cost_for`)."""


def batch_cost_for(device: torch.device | str) -> int | None:
    """The cost of one more batch for `length_batches` on `device`: BATCH_COST_TOKENS on CPU; None (the
    fewest batches, each as narrow as they allow) elsewhere."""
    return BATCH_COST_TOKENS if torch.device(device).type == "cpu" else None


def length_batches(
    lengths: Sequence[int], batch_size: int, batch_cost: int | None = BATCH_COST_TOKENS
) -> list[tuple[list[int], int]]:
    """(row indices, padded width) of each batch: rows in order of length (stable), cut into batches of at
    most `batch_size` rows where the cuts minimise padded tokens + `batch_cost` per batch (dynamic
    programming over the sorted rows), so rows of similar length share a batch and a long row does not
    widen a batch of short ones; `batch_cost` None keeps the fewest batches. The width is the batch's
    longest row, not rounded up to a multiple of 8 or 16: on CPU, exact widths scored the demo's
    validation rows 1.2-1.35x faster (docs/benchmarks.md)."""
    if batch_size <= 0:
        raise FishmergeError(f"batch size must be positive, got {batch_size}")
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    widths = np.maximum(1, np.asarray(lengths, dtype=np.int64)[order])
    n = len(order)
    if batch_cost is None:  # more than any cut could save in padding: the fewest batches
        batch_cost = int(widths.sum()) * batch_size + 1
    cost = np.zeros(n + 1, dtype=np.int64)  # cost[j]: the cheapest cut of the j shortest rows
    start = np.zeros(n + 1, dtype=np.int64)  # where the last batch of that cut starts
    for j in range(1, n + 1):
        i = np.arange(max(0, j - batch_size), j)
        options = cost[i] + (j - i) * widths[j - 1] + batch_cost
        k = int(np.argmin(options))  # the first minimum: the largest batch on ties
        cost[j], start[j] = options[k], i[k]
    cuts, j = [], n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return [(order[a:b].tolist(), int(widths[b - 1])) for a, b in reversed(cuts)]


@dataclass
class Encoded:
    """Tokenized selected examples, right-padded to the longest of them; `batches` cuts each batch to its own
    width (rows of similar length together)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    example_ids: list[int]
    token_type_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.example_ids)

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[dict, list[int]]]:
        """(model inputs on device, dataset row ids) per batch: rows of similar length together
        (`length_batches`), each batch cut to its own width, so no batch computes over the padding the
        longest row of the whole selection needs. Rows are right-padded, so the mask's sum is a row's length."""
        lengths = self.attention_mask.sum(1).tolist()
        for idx, width in length_batches(lengths, batch_size, batch_cost_for(device)):
            rows = torch.tensor(idx, dtype=torch.long)
            batch = {"input_ids": self.input_ids[rows, :width], "attention_mask": self.attention_mask[rows, :width]}
            if self.token_type_ids is not None:
                batch["token_type_ids"] = self.token_type_ids[rows, :width]
            if self.labels is not None:
                per_token = self.labels.shape == self.input_ids.shape  # LM / token labels follow the cut
                batch["labels"] = self.labels[rows, :width] if per_token else self.labels[rows]
            yield {k: v.to(device) for k, v in batch.items()}, [self.example_ids[i] for i in idx]


def label_values(raw: list, label2id: dict | None, regression: bool) -> torch.Tensor:
    """Labels as a tensor: floats for regression, else class ids (names mapped through label2id)."""
    if regression:
        return torch.tensor([float(v) for v in raw], dtype=torch.float32)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        return torch.tensor([int(v) for v in raw], dtype=torch.long)
    table = {str(k): int(v) for k, v in (label2id or {}).items()}
    unknown = sorted({str(v) for v in raw if str(v) not in table})
    if unknown:
        raise FishmergeError(
            f"label value(s) {unknown[:5]} are not integers and not in the model's label2id {table}: "
            "map labels to class ids, or save the model with a matching id2label/label2id."
        )
    return torch.tensor([table[str(v)] for v in raw], dtype=torch.long)


def encode(
    dataset,
    indices: Sequence[int],
    tokenizer,
    *,
    text_fields: Sequence[str],
    label_field: str | None,
    max_length: int,
    label2id: dict | None = None,
    regression: bool = False,
    head: str | None = None,
    messages_field: str | None = None,
) -> Encoded:
    """Tokenize the selected rows (pairs when two text fields), right-padded to the longest ≤ max_length.
    A causal LM's rows go through `encode_lm` (plain text, prompt/response or chat; labels mask the prompt)."""
    if head == "causal_lm":
        fields = [messages_field] if messages_field else list(text_fields)
        check_columns(dataset.column_names, fields, "text")
        return encode_lm(
            column_values(dataset.select(indices), fields), tokenizer, text_fields, messages_field, max_length, indices
        )
    check_columns(dataset.column_names, text_fields, "text")
    if label_field is not None:
        check_columns(dataset.column_names, [label_field], "label")
    if len(text_fields) not in (1, 2):
        raise FishmergeError(f"--text-fields takes one or two columns, got {list(text_fields)}")
    columns = column_values(dataset.select(indices), [*text_fields, *([label_field] if label_field else [])])
    texts = [["" if t is None else str(t) for t in columns[f]] for f in text_fields]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    check_unknown_rate(tokenizer, enc["input_ids"], enc["attention_mask"])
    labels = label_values(columns[label_field], label2id, regression) if label_field else None
    return Encoded(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        token_type_ids=enc.get("token_type_ids"),
        labels=labels,
        example_ids=list(indices),
    )


def check_unknown_rate(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: float = 0.9) -> None:
    """Refuse a tokenizer that maps nearly every word of the data to its unknown token (a wrong or
    empty tokenizer would give a Fisher of nothing but [UNK] with exit 0)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) - {unk}), dtype=input_ids.dtype)
    ids = input_ids[attention_mask.bool()]
    words = ids[~torch.isin(ids, special)]
    rate = float((words == unk).float().mean()) if words.numel() else 0.0
    if words.numel() >= 20 and rate >= limit:
        raise FishmergeError(
            f"the tokenizer maps {rate:.0%} of the data's tokens to "
            f"{tokenizer.unk_token!r}: it is not this model's tokenizer, or has no vocabulary; save the model's "
            "own tokenizer next to it"
        )


def data_fingerprint(dataset, indices: Sequence[int], fields: Sequence[str]) -> str:
    """Content hash of the selected rows' fields (what the Fisher was computed on)."""
    h = hashlib.sha256()
    cols = column_values(dataset.select(indices), fields)
    for i, idx in enumerate(indices):
        h.update(json.dumps([int(idx), [str(cols[f][i]) for f in fields]]).encode())
    return "sha256:" + h.hexdigest()


# ---- causal LMs: plain text, prompt/response pairs, chat messages -------------------------------------------


def lm_format(head: str, text_fields: Sequence[str], messages_field: str | None) -> str | None:
    """'pairs' or 'chat' when only a causal LM's response tokens count; None for plain text and classifiers."""
    if head != "causal_lm":
        return None
    if messages_field:
        return "chat"
    return "pairs" if len(text_fields) == 2 else None


def lm_fields(head: str, text_fields: Sequence[str], messages_field: str | None) -> None:
    """Refuse data fields a causal LM (or a classifier) cannot be fed, before any work."""
    if messages_field and head != "causal_lm":
        raise FishmergeError(
            f"a messages column ('{messages_field}') is for causal LMs, and this model is a {head} model: "
            "give it text_fields instead"
        )
    if head == "causal_lm" and not messages_field and len(text_fields) not in (1, 2):
        raise FishmergeError(
            f"a causal LM's data takes one text column (plain text) or two (prompt, response), got {list(text_fields)}"
        )


def _chat_ids(tokenizer, messages) -> tuple[list[int], int]:
    """Token ids of a conversation by the tokenizer's chat template, and where its last (response) turn starts."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            messages = None
    ok = (
        isinstance(messages, list)
        and len(messages) >= 2
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    )
    if not ok:
        raise FishmergeError(
            "a messages cell must be a list of at least two {role, content} turns (the last is the response), "
            f"got {str(messages)[:80]!r}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise FishmergeError(
            "the data has a messages column but the tokenizer has no chat template: save the model's tokenizer with "
            "its chat_template, or give the data prompt/response text_fields"
        )

    def ids(turns, prompt: bool) -> list[int]:
        try:
            out = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=prompt)
        except Exception as exc:  # jinja TemplateError, or the template's own raise_exception
            raise FishmergeError(
                f"the tokenizer's chat template fails on a conversation of {len(turns)} turn(s): {exc}; fix the "
                "messages (roles, order) or the template"
            ) from None
        out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in out]

    full, prompt = ids(messages, False), ids(messages[:-1], True)
    if full[: len(prompt)] != prompt:
        raise FishmergeError(
            "the chat template renders the prompt differently alone and before its response: "
            "fishmerge cannot tell which tokens are the response; give the data prompt/response text_fields"
        )
    return full, len(prompt)


def lm_token_ids(
    tokenizer, row: dict, text_fields: Sequence[str], messages_field: str | None, max_length: int
) -> tuple[list[int], int]:
    """One row as (token ids, index of the first counted token), at most max_length ids.

    Plain text: every token counts (the tokenizer's own truncation, as for classifiers). Prompt/response: prompt (with the tokenizer's special tokens), then the
    response and EOS, tokenized apart (the usual SFT layout); only response tokens count. Chat: the
    conversation by the chat template; only the last turn counts. Pairs and chats keep their first
    max_length ids (the prompt first)."""
    if messages_field:
        ids, start = _chat_ids(tokenizer, row[messages_field])
        return ids[:max_length], start
    texts = ["" if row[f] is None else str(row[f]) for f in text_fields]
    if len(texts) == 1:
        return [int(i) for i in tokenizer(texts[0], truncation=True, max_length=max_length)["input_ids"]], 0
    prompt = [int(i) for i in tokenizer(texts[0])["input_ids"]]
    response = [int(i) for i in tokenizer(texts[1], add_special_tokens=False)["input_ids"]]
    if tokenizer.eos_token_id is not None:
        response.append(int(tokenizer.eos_token_id))
    return (prompt + response)[:max_length], len(prompt)


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the pad token, else EOS (set as the pad token); neither is an error."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise FishmergeError("the tokenizer has neither a pad nor an eos token: save it with a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def encode_lm(
    columns: dict[str, list],
    tokenizer,
    text_fields: Sequence[str],
    messages_field: str | None,
    max_length: int,
    example_ids: Sequence[int],
    pad_to_max: bool = False,
) -> Encoded:
    """Causal-LM rows right-padded to the longest (or to max_length), truncated to max_length; `labels` are
    the input ids where a token counts (prediction target) and −100 elsewhere (prompt, padding)."""
    pad_id = pad_token_id(tokenizer)
    n = len(example_ids)
    rows = [{f: columns[f][i] for f in columns} for i in range(n)]
    seqs = [lm_token_ids(tokenizer, r, text_fields, messages_field, max_length) for r in rows]
    width = max_length if pad_to_max else max([len(ids) for ids, _ in seqs] + [1])
    enc = pad_lm(seqs, width, pad_id, example_ids)
    check_unknown_rate(tokenizer, enc.input_ids, enc.attention_mask)
    return enc


def pad_lm(seqs: Sequence[tuple[list[int], int]], width: int, pad_id: int, example_ids: Sequence[int]) -> Encoded:
    """Rows of (token ids, first counted token) from `lm_token_ids`, right-padded to `width` with their
    attention mask and labels (the ids where a token counts, −100 elsewhere)."""
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, start) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        labels[i, start : len(ids)] = torch.tensor(ids[start:], dtype=torch.long)
    return Encoded(input_ids=input_ids, attention_mask=attention, labels=labels, example_ids=list(example_ids))
