"""The pyfunc served for a registered merged model: a Hugging Face classifier in artifact `model_dir`.

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
    """Pyfunc over a Hugging Face sequence classifier stored as artifact `model_dir` (safetensors).

    predict: a DataFrame with column `text` (and optional `text_b` for pairs), or a list of strings
    → the predicted label names (config.id2label). Pickled by value: loading needs mlflow, torch,
    transformers and pandas, not fishmerge.
    """

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model_dir"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        conf = dict(getattr(context, "model_config", None) or {})
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(conf.get("max_length", 128)), int(limit))
        self.batch_size = int(conf.get("batch_size", 32))
        self.padding = "max_length" if self.device == "cpu" else True  # fixed shapes on CPU: no re-planning

    @staticmethod
    def _columns(model_input) -> tuple[list[str], list[str] | None]:
        import pandas as pd

        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if isinstance(model_input, pd.DataFrame):
            if "text" in model_input.columns:
                text = model_input["text"]
            elif model_input.shape[1] == 1:
                text = model_input.iloc[:, 0]
            else:
                raise ValueError(
                    f"input needs a 'text' column (and optional 'text_b'), got {list(model_input.columns)}"
                )
            pair = model_input["text_b"] if "text_b" in model_input.columns else None
        else:
            text, pair = list(model_input), None
        as_str = lambda col: ["" if v is None else str(v) for v in col]  # noqa: E731
        return as_str(text), (as_str(pair) if pair is not None else None)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # (the DataFrame hint only silences MLflow's signature inference: lists and dicts are accepted too)
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
