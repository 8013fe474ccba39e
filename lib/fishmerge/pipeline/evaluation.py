"""Evaluation of merged and input models: class probabilities and classification metrics; causal LMs' token
log-likelihoods, NLL and perplexity; output ensembles of both.

Batched, in eval mode under `torch.inference_mode`, on CPU (large Linear products on oneDNN) or GPU. Rows
are tokenized once, ordered by length and batched with rows of similar length (`length_batches`), each
batch padded to its longest row; results come back in the rows' order. Metrics are plain numpy so they can be checked against scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fishmerge.errors import FishmergeError
from fishmerge.forward.first_position import first_position_only
from fishmerge.forward.onednn_linear import onednn_linears
from fishmerge.io.checkpoint import resolve_device
from fishmerge.io.data import (
    batch_cost_for,
    check_columns,
    column_values,
    label_values,
    length_batches,
    load_split,
    pad_token_id,
)


def load_eval_rows(
    data_path: str, split: str, text_fields: list[str], label_field: str | None, limit: int | None = None
) -> list[dict]:
    """The first `limit` rows (all when None) of a split as dicts holding only the text and label fields.

    Same loaders as Fisher estimation (`fishmerge.io.data.load_split`): a save_to_disk folder or a
    .csv/.json/.jsonl/.parquet file. The first rows, not a sample, so every evaluation of a split is
    over the same examples.
    """
    if len(text_fields) not in (1, 2):
        raise FishmergeError(f"text fields take one or two columns, got {list(text_fields)}")
    if limit is not None and limit <= 0:
        raise FishmergeError(f"the evaluation limit must be positive, got {limit}")
    dataset = load_split(data_path, split)
    fields = list(text_fields) + ([label_field] if label_field else [])
    check_columns(dataset.column_names, list(text_fields), "text")
    if label_field:
        check_columns(dataset.column_names, [label_field], "label")
    if len(dataset) == 0:
        raise FishmergeError(f"split '{split}' of '{data_path}' is empty: nothing to evaluate on")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    columns = column_values(dataset, fields)
    return [{f: columns[f][i] for f in fields} for i in range(len(dataset))]


def label_ids(rows: Sequence[dict], label_field: str, label2id: dict | None = None) -> np.ndarray:
    """Integer class ids of the rows' labels: ints as they are, names through the model's label2id."""
    raw = [r[label_field] for r in rows]
    return label_values(raw, label2id, regression=False).numpy()


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _texts(rows: Sequence[dict], text_fields: Sequence[str]) -> list[list[str]]:
    if len(text_fields) not in (1, 2):
        raise FishmergeError(f"text fields take one or two columns, got {list(text_fields)}")
    if rows:
        check_columns(list(rows[0]), list(text_fields), "text")
    return [["" if r[f] is None else str(r[f]) for r in rows] for f in text_fields]


def _progress(batches: list[tuple[list[int], int]], progress: bool, desc: str):
    with tqdm(total=sum(len(i) for i, _ in batches), disable=not progress, desc=desc, unit="ex") as bar:
        for idx, width in batches:
            yield idx, width
            bar.update(len(idx))


def _pad_rows(values: list[list[int]], width: int, pad: int, device: torch.device) -> torch.Tensor:
    out = torch.full((len(values), width), pad, dtype=torch.long)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v, dtype=torch.long)
    return out.to(device)


def class_probabilities(
    model,
    tokenizer,
    rows: Sequence[dict],
    text_fields: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Softmax probabilities (n, C) of a *ForSequenceClassification model; pairs when two text fields.

    The model is moved to `device` and put in eval mode. Softmax in fp32 whatever the model dtype. A
    BERT-family classifier computes its last layer for the one position its head reads
    (`fishmerge.forward.first_position`); large fp32 products run on oneDNN on CPU
    (`fishmerge.forward.onednn_linear`).
    """
    dev = _device(device)
    texts = _texts(rows, text_fields)
    enc = tokenizer(*texts, truncation=True, max_length=max_length) if rows else {"input_ids": []}
    pads = {"input_ids": pad_token_id(tokenizer), "token_type_ids": tokenizer.pad_token_type_id}
    fields = [k for k in pads if k in enc]
    lengths = [len(x) for x in enc["input_ids"]]
    model.to(dev).eval()
    out: np.ndarray | None = None
    batches = length_batches(lengths, batch_size, batch_cost_for(dev))
    with torch.inference_mode(), first_position_only(model), onednn_linears(model):
        for idx, width in _progress(batches, progress, "evaluate"):
            batch = {k: _pad_rows([enc[k][i] for i in idx], width, pads[k], dev) for k in fields}
            # the mask from the rows' lengths, whatever the tokenizer returns: padding is never attended
            batch["attention_mask"] = (
                torch.arange(width, device=dev) < torch.tensor([lengths[i] for i in idx], device=dev)[:, None]
            ).long()
            logits = model(**batch).logits
            if logits.dim() != 2:
                raise FishmergeError(
                    f"expected (batch, classes) logits from a *ForSequenceClassification model, got shape {tuple(logits.shape)}"
                )
            if out is None:
                out = np.zeros((len(rows), logits.shape[-1]))
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    if out is None:
        return np.zeros((0, int(getattr(model.config, "num_labels", 0))), dtype=np.float64)
    return out


def _check_pair(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    if y.shape != p.shape:
        raise FishmergeError(f"{y.size} labels but {p.size} predictions: they must match one to one")
    if y.size == 0:
        raise FishmergeError("no labels to score: the evaluation set is empty")
    return y, p


def accuracy(labels, preds) -> float:
    """Fraction of predictions equal to the labels."""
    y, p = _check_pair(labels, preds)
    return float(np.mean(y == p))


def macro_f1(labels, preds, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN).

    Over the classes present in labels ∪ preds (scikit-learn's `f1_score(average="macro")`), or over
    0..num_classes-1 when given (a class never seen nor predicted then scores 0, as in scikit-learn).
    """
    y, p = _check_pair(labels, preds)
    if num_classes is None:
        classes = np.union1d(y, p)
    else:
        bad = sorted(set(np.union1d(y, p).tolist()) - set(range(num_classes)))
        if bad:
            raise FishmergeError(f"class ids {bad[:5]} are outside 0..{num_classes - 1}")
        classes = np.arange(num_classes)
    scores = []
    for c in classes:
        tp = np.sum((y == c) & (p == c))
        denom = 2 * tp + np.sum((y != c) & (p == c)) + np.sum((y == c) & (p != c))
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": macro_f1,
}


def classification_metrics(probs: np.ndarray, labels, metrics: Sequence[str] = ("accuracy", "f1")) -> dict[str, float]:
    """Named metrics of argmax predictions: accuracy, f1 (macro over classes in labels ∪ predictions)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise FishmergeError(f"unknown metric(s) {unknown}: valid metrics are {', '.join(METRICS)}")
    probs = np.asarray(probs)
    y = np.asarray(labels).ravel()
    if probs.ndim != 2 or probs.shape[0] != y.size:
        raise FishmergeError(
            f"probabilities of shape {probs.shape} do not match {y.size} labels: expected ({y.size}, C)"
        )
    if y.size and (y.min() < 0 or y.max() >= probs.shape[1]):
        raise FishmergeError(
            f"labels span {int(y.min())}..{int(y.max())} but the model has {probs.shape[1]} classes: "
            "check the label field and the model's label2id"
        )
    preds = probs.argmax(axis=1)
    return {m: METRICS[m](y, preds) for m in metrics}


def lm_token_logprobs(
    model,
    tokenizer,
    rows: Sequence[dict],
    text_fields: Sequence[str],
    messages_field: str | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """log p(token) of every counted next token of a causal LM, row by row in order (fp64, flat).

    Rows are encoded as for the Fisher (`fishmerge.io.data.lm_token_ids` and `pad_lm`: plain text, prompt/response or
    chat; only response tokens count for the last two), truncated to `max_length`; token t+1 is
    predicted from tokens ≤ t. Log-softmax in fp32. The same rows give the same positions for every
    model with this tokenizer, so arrays of several models line up (output ensembling)."""
    from fishmerge.io.data import check_unknown_rate, lm_token_ids, pad_lm

    dev = _device(device)
    fields = [messages_field] if messages_field else list(text_fields)
    if rows:
        check_columns(list(rows[0]), fields, "text")
    pad_id = pad_token_id(tokenizer)
    seqs = [lm_token_ids(tokenizer, r, text_fields, messages_field, max_length) for r in rows]
    model.to(dev).eval()
    per_row: list[np.ndarray] = [np.zeros(0)] * len(rows)
    batches = length_batches([len(ids) for ids, _ in seqs], batch_size, batch_cost_for(dev))
    with torch.inference_mode(), onednn_linears(model):
        for idx, width in _progress(batches, progress, "nll"):
            enc = pad_lm([seqs[i] for i in idx], width, pad_id, idx)
            check_unknown_rate(tokenizer, enc.input_ids, enc.attention_mask)
            ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            keep = enc.labels[:, 1:].to(dev) != -100
            bad = ~torch.isfinite(logits).all(-1) & keep
            if bool(bad.any()):
                rows_bad = sorted({idx[int(i)] for i in torch.nonzero(bad)[:, 0].tolist()})
                raise FishmergeError(
                    f"the model gives NaN/Inf logits on row(s) {rows_bad[:10]}: its weights or dtype overflow "
                    "(try dtype float32); a model with non-finite outputs is never scored"
                )
            # log p(token) = logit − logsumexp: no second (B, T, V) tensor for a log-softmax
            logp = (logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)).double().cpu()
            keep = keep.cpu()
            for j, i in enumerate(idx):
                per_row[i] = logp[j][keep[j]].numpy()
    values = np.concatenate(per_row) if per_row else np.zeros(0)
    if values.size == 0:
        raise FishmergeError(
            "no token to predict: every text (or response) is empty or a single token after tokenization"
        )
    return values


def lm_metrics(logprobs: np.ndarray, metrics: Sequence[str] = ("nll", "perplexity")) -> dict[str, float]:
    """nll = mean negative log-likelihood per counted token (nats); perplexity = exp(nll)."""
    unknown = [m for m in metrics if m not in ("nll", "perplexity")]
    if unknown:
        raise FishmergeError(f"unknown LM metric(s) {unknown}: valid are nll, perplexity")
    nll = float(-np.mean(logprobs))
    if not math.isfinite(nll):
        raise FishmergeError(
            f"the mean NLL is {nll}: a token has probability 0 (non-finite outputs); nothing is scored"
        )
    if "perplexity" in metrics and nll > 700:
        raise FishmergeError(f"perplexity overflows: mean NLL {nll:.1f} nats per token; score this model by nll")
    values = {"nll": nll, "perplexity": math.exp(nll) if "perplexity" in metrics else None}
    return {m: values[m] for m in metrics}


def ensemble_logprobs(logprob_list: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """log Σᵢ wᵢ pᵢ(token) per counted token: the output ensemble of LMs (their next-token distributions
    averaged with weights normalised to sum 1), read at the true tokens."""
    w = _ensemble_weights(len(logprob_list), weights)
    mats = np.stack([np.asarray(v, dtype=np.float64) for v in logprob_list])
    top = mats.max(axis=0)
    return top + np.log(np.einsum("k,kn->n", w, np.exp(mats - top)))


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """exp(total next-token NLL / number of predicted tokens) of a causal LM over plain texts."""
    rows = [{"text": "" if t is None else str(t)} for t in texts]
    values = lm_token_logprobs(model, tokenizer, rows, ["text"], None, batch_size, max_length, device, progress)
    return lm_metrics(values, ["perplexity"])["perplexity"]


def _ensemble_weights(n: int, weights: Sequence[float]) -> np.ndarray:
    if n == 0:
        raise FishmergeError("no model outputs to ensemble")
    if n != len(weights):
        raise FishmergeError(f"{n} model outputs but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise FishmergeError(f"ensemble weights must be finite, ≥ 0 and not all 0, got {list(weights)}")
    return w / w.sum()


def ensemble_probabilities(prob_list: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """λ-weighted average of (n, C) probability matrices, weights normalised to sum to 1.

    The output ensemble a merge is compared against (same λ as the merge).
    """
    w = _ensemble_weights(len(prob_list), weights)
    mats = [np.asarray(p, dtype=np.float64) for p in prob_list]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1:
        raise FishmergeError(
            f"probability matrices differ in shape {sorted(shapes)}: evaluate every model on the same rows"
        )
    return sum(wi * m for wi, m in zip(w, mats, strict=True))
