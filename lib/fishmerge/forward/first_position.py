"""Score an encoder classifier with its last layer computed for the first position only.

A BERT-family sequence classifier reads one position of its last layer (the [CLS] / <s> token, through
the pooler or the classification head). That layer's queries, attention output and feed-forward are
needed for that position alone; only its keys and values need every token. For MiniLM-L6 (6 layers)
this skips 14 % of the forward's arithmetic; the probabilities agree with the full forward to float
rounding (tests compare every supported architecture with both attention kernels).

Applied to the classes whose layers are BERT's (Bert, RoBERTa, XLM-R, CamemBERT, ELECTRA) and only in
eval mode with eager or SDPA attention; any other model runs its own forward unchanged.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from fishmerge.forward.patches import ModelPatch

# class of the model -> class of its layers: heads that read position 0 of the last hidden state
SUPPORTED = {
    "BertForSequenceClassification": "BertLayer",
    "RobertaForSequenceClassification": "RobertaLayer",
    "XLMRobertaForSequenceClassification": "XLMRobertaLayer",
    "CamembertForSequenceClassification": "CamembertLayer",
    "ElectraForSequenceClassification": "ElectraLayer",
}


class FirstPositionLayer(torch.nn.Module):
    """A BERT layer's forward for position 0 of its output: keys and values over every token, the rest
    over the first; returns (batch, 1, hidden)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.bert.modeling_bert import eager_attention_forward

        layer, attn = self.layer, self.layer.attention.self
        batch, width, _ = hidden_states.shape
        first = hidden_states[:, :1]
        size = attn.attention_head_size
        query = attn.query(first).view(batch, 1, -1, size).transpose(1, 2)
        key = attn.key(hidden_states).view(batch, width, -1, size).transpose(1, 2)
        value = attn.value(hidden_states).view(batch, width, -1, size).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] != 1:
            attention_mask = attention_mask[:, :, :1, :]  # the first query's row of the (B, 1, T, T) mask
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        context, _ = kernel(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling)
        attended = layer.attention.output(context.reshape(batch, 1, -1).contiguous(), first)
        return layer.output(layer.intermediate(attended), attended)


def applies(model: torch.nn.Module) -> bool:
    """Whether `model` is a supported transformers classifier in a state where the first-position forward
    gives its own logits: eval mode throughout, no decoder or cross-attention, no feed-forward chunking,
    eager or SDPA attention, and no hidden states or attentions asked for by its config (the cut layer
    returns one position and no attention weights)."""
    config = getattr(model, "config", None)
    layer_class = SUPPORTED.get(type(model).__name__)
    if layer_class is None or config is None or not type(model).__module__.startswith("transformers.models."):
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False):
        return False
    if getattr(config, "chunk_size_feed_forward", 0) or getattr(config, "_attn_implementation", None) not in (
        "eager",
        "sdpa",
    ):
        return False
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return False
    last = layers[-1]
    return (
        type(last).__name__ == layer_class
        and hasattr(getattr(getattr(last, "attention", None), "self", None), "scaling")
        and not any(m.training for m in model.modules())
    )


def _cut(model: torch.nn.Module) -> None:
    layers = model.base_model.encoder.layer
    if not isinstance(layers[-1], FirstPositionLayer):
        layers[-1] = FirstPositionLayer(layers[-1])


def _restore(model: torch.nn.Module) -> None:
    layers = model.base_model.encoder.layer
    if isinstance(layers[-1], FirstPositionLayer):
        layers[-1] = layers[-1].layer


_CUT = ModelPatch(applies, _cut, _restore)


def first_position_only(model: torch.nn.Module) -> AbstractContextManager[bool]:
    """While inside, a supported classifier computes its last layer for position 0 only (yields True);
    any other model is left as it is (yields False). The layer is put back when the last caller using this
    model leaves, error or not. Do not ask the model for hidden states or attentions inside."""
    return _CUT.active(model)
