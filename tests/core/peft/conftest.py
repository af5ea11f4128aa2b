"""Tiny randomly initialised models (built from configs, no downloads) shared by the PEFT tests."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 100
WIDTH = 32


def bert_config(layers: int = 2, **kw) -> BertConfig:
    return BertConfig(hidden_size=WIDTH, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
                      vocab_size=VOCAB, max_position_embeddings=64, **kw)


def build_bert(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return BertModel(bert_config(layers)).eval()


def build_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=16, d_ff=37, num_layers=2, num_decoder_layers=2,
                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def build_bart(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


def build_bert2bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    decoder = BertLMHeadModel(bert_config(is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=BertModel(bert_config()), decoder=decoder)
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 2
    model.config.pad_token_id = model.generation_config.pad_token_id = 0
    return model.eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {"bert": build_bert, "t5": build_t5, "bart": build_bart}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded row, so masks are exercised
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, VOCAB, (2, 4), generator=g)}
