"""The pyfunc served for a registered merged model: a Hugging Face classifier or causal LM in artifact
`model_dir`.

Pickled by value (this module imports nothing of fishmerge): loading needs mlflow, torch,
transformers and pandas, not fishmerge.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import mlflow
import pandas as pd


class FishmergeHFModel(mlflow.pyfunc.PythonModel):
    """Pyfunc over a Hugging Face model stored as artifact `model_dir` (safetensors): a sequence
    classifier predicts label names, a causal LM generates text.

    Classifier predict: a DataFrame with column `text` (and optional `text_b` for pairs), or a list of
    strings → the predicted label names (config.id2label).
    Causal LM predict: a DataFrame with column `prompt` (or `text`), or a list of strings → each
    prompt's continuation (greedy, up to `max_new_tokens` of the model_config, default 32; prompts
    rendered by the tokenizer's chat template when model_config `chat` is true).
    Pickled by value: loading needs mlflow, torch, transformers and pandas, not fishmerge.
    """

    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model_dir"]
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or [""]
        self.generates = archs[0].endswith(("ForCausalLM", "LMHeadModel"))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        auto = AutoModelForCausalLM if self.generates else AutoModelForSequenceClassification
        self.model = auto.from_pretrained(path, use_safetensors=True)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        conf = dict(getattr(context, "model_config", None) or {})
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(conf.get("max_length", 128)), int(limit))
        self.batch_size = int(conf.get("batch_size", 32))
        self.max_new_tokens = int(conf.get("max_new_tokens", 32))
        self.chat = bool(conf.get("chat", False))
        self.padding = "max_length" if self.device == "cpu" else True  # fixed shapes on CPU: no re-planning

    @staticmethod
    def _columns(model_input, first: str = "text") -> tuple[list[str], list[str] | None]:
        import pandas as pd

        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if isinstance(model_input, pd.DataFrame):
            if first in model_input.columns:
                text = model_input[first]
            elif "text" in model_input.columns:
                text = model_input["text"]
            elif model_input.shape[1] == 1:
                text = model_input.iloc[:, 0]
            else:
                raise ValueError(
                    f"input needs a '{first}' column (or 'text'; 'text_b' for pairs), got {list(model_input.columns)}"
                )
            pair = model_input["text_b"] if "text_b" in model_input.columns else None
        else:
            text, pair = list(model_input), None
        as_str = lambda col: ["" if v is None else str(v) for v in col]  # noqa: E731
        return as_str(text), (as_str(pair) if pair is not None else None)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # (the DataFrame hint only silences MLflow's signature inference: lists and dicts are accepted too)
        if self.generates:
            return self._generate(self._columns(model_input, "prompt")[0])
        import torch

        text, pair = self._columns(model_input)
        id2label = self.model.config.id2label
        out: list[str] = []
        with torch.inference_mode():
            for s in range(0, len(text), self.batch_size):
                args = [text[s : s + self.batch_size]] + ([pair[s : s + self.batch_size]] if pair else [])
                enc = self.tokenizer(
                    *args, truncation=True, max_length=self.max_length, padding=self.padding, return_tensors="pt"
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                ids = self.model(**enc).logits.argmax(-1).tolist()
                out.extend(str(id2label.get(i, id2label.get(str(i), i))) for i in ids)
        return out

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations, one prompt at a time (no padding: exact, and prompts of any length)."""
        import torch

        out = []
        chat = self.chat and getattr(self.tokenizer, "chat_template", None)
        self.tokenizer.truncation_side = "left"  # a long prompt keeps its end (where the answer starts)
        with torch.inference_mode():
            for prompt in prompts:
                if chat:
                    prompt = self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                    )
                enc = self.tokenizer(
                    prompt,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=not chat,  # the template renders its own BOS
                    return_tensors="pt",
                )
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                ids = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                out.append(self.tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        return out


@contextmanager
def pickle_by_value():
    """Pickle FishmergeHFModel by value, so a logged model does not need fishmerge's `lib` to load."""
    import cloudpickle

    module = sys.modules[__name__]
    registered = module.__name__ in cloudpickle.list_registry_pickle_by_value()
    if not registered:
        cloudpickle.register_pickle_by_value(module)
    quiet = logging.getLogger("mlflow.pyfunc")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the "serialized using CloudPickle" warning: deliberate here
    try:
        yield
    finally:
        quiet.setLevel(level)
        if not registered:
            cloudpickle.unregister_pickle_by_value(module)


def default_pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (explicit, so MLflow infers nothing)."""
    import pandas
    import safetensors
    import torch
    import transformers

    def pin(m) -> str:
        return m.__version__.split("+")[0]  # drop local tags such as +cpu: not on PyPI

    return [
        f"mlflow=={pin(mlflow)}",
        f"torch=={pin(torch)}",
        f"transformers=={pin(transformers)}",
        f"safetensors=={pin(safetensors)}",
        f"pandas=={pin(pandas)}",
    ]
