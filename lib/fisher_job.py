"""One Fisher estimation end to end: model directory + dataset → Fisher store v1."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from lib.checkpoint import checkpoint_keys, checkpoint_names, load_model, model_fingerprint
from lib.data import data_fingerprint, encode, load_split, select_indices
from lib.errors import FishmergeError
from lib.fisher_engine import DEFAULT_MAX_MEMORY, FisherAccumulator
from lib.fisher_likelihood import detect_head
from lib.fisher_store import write_fisher_store


@dataclass
class FisherSpec:
    """Everything that determines a Fisher (what `fishmerge fisher` takes)."""

    model: str
    data: str
    split: str = "train"
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    label_field: str | None = "label"
    estimator: str = "exact"
    examples: int | None = 1000
    seed: int = 0
    batch_size: int = 16
    max_length: int = 128
    device: str = "auto"
    dtype: str = "auto"
    max_memory: int = DEFAULT_MAX_MEMORY
    fallback: str = "vmap"


def run_fisher(spec: FisherSpec, store: str, progress: bool = True) -> str:
    """Estimate the Fisher of `spec` and write it to `store`; return the store URI."""
    dataset = load_split(spec.data, spec.split)
    indices = select_indices(len(dataset), spec.examples, spec.seed)
    model, tokenizer = load_model(spec.model, spec.device, spec.dtype)
    head = detect_head(model)
    regression = head == "sequence_classification" and model.config.num_labels == 1
    label_field = spec.label_field
    needs_labels = spec.estimator == "empirical" and head != "causal_lm"
    if label_field and label_field not in dataset.column_names and not needs_labels:
        label_field = None  # the default 'label' is only needed for the empirical estimator
    if head == "causal_lm":
        label_field = None
    if needs_labels and not label_field:
        raise FishmergeError("the 'empirical' estimator needs --label-field")
    if model.config.pad_token_id is None and tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    encoded = encode(
        dataset,
        indices,
        tokenizer,
        text_fields=spec.text_fields,
        label_field=label_field,
        max_length=spec.max_length,
        label2id=getattr(model.config, "label2id", None),
        regression=regression,
    )
    keys = checkpoint_keys(spec.model)
    names = checkpoint_names(model, keys)
    device = next(model.parameters()).device
    started = time.perf_counter()
    with FisherAccumulator(
        model, spec.estimator, head=head, seed=spec.seed, max_memory=spec.max_memory, fallback=spec.fallback
    ) as acc:
        bar = tqdm(
            total=len(encoded), unit="ex", desc=f"fisher[{spec.estimator}]", disable=not progress, mininterval=1.0
        )
        for batch, ids in encoded.batches(spec.batch_size, device):
            acc.add_batch(batch, ids)
            bar.update(len(ids))
        bar.close()
        fisher = acc.fisher()
    wall = time.perf_counter() - started
    tensors = {names[k]: v.numpy() for k, v in fisher.items()}
    attrs = {
        "estimator": spec.estimator,
        "n_examples": len(encoded),
        "model_fingerprint": model_fingerprint(spec.model),
        "data_fingerprint": data_fingerprint(
            dataset, indices, [*spec.text_fields, *([label_field] if label_field else [])]
        ),
        "head": head,
        "spec": {**asdict(spec), "label_field": label_field},
        "padded_length": int(encoded.input_ids.shape[1]),
        "device": str(device),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "fallback_modules": acc.fallback_modules,
        "wall_time_s": round(wall, 3),
        "examples_per_s": round(len(encoded) / wall, 3) if wall > 0 else None,
    }
    return write_fisher_store(store, tensors, attrs)
