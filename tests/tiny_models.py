"""Tiny randomly initialised Hugging Face models, built locally from configs (no hub)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, initializer_range=0.3)


def _bert_cfg(**kw):
    return tf.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        pad_token_id=0,
        **COMMON,
        **kw,
    )


def _roberta_cfg(**kw):
    return tf.RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=42,
        pad_token_id=1,
        **COMMON,
        **kw,
    )


def _gpt2_cfg(**kw):
    return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=40, pad_token_id=0, **COMMON, **kw)


def _llama_cfg(**kw):
    return tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        pad_token_id=0,
        **COMMON,
        **kw,
    )


BUILDERS = {
    "bert-cls": lambda: tf.BertForSequenceClassification(_bert_cfg(num_labels=3)),
    "bert-cls2": lambda: tf.BertForSequenceClassification(_bert_cfg(num_labels=2)),
    "bert-reg": lambda: tf.BertForSequenceClassification(_bert_cfg(num_labels=1)),
    "bert-tok": lambda: tf.BertForTokenClassification(_bert_cfg(num_labels=4)),
    "roberta-cls": lambda: tf.RobertaForSequenceClassification(_roberta_cfg(num_labels=3)),
    "gpt2-cls": lambda: tf.GPT2ForSequenceClassification(_gpt2_cfg(num_labels=3)),
    "gpt2-lm": lambda: tf.GPT2LMHeadModel(_gpt2_cfg()),
    "llama-lm": lambda: tf.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=False)),
    "llama-lm-tied": lambda: tf.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True)),
    "llama-cls": lambda: tf.LlamaForSequenceClassification(_llama_cfg(num_labels=3)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    return model.eval()
