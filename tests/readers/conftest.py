"""Tiny randomly initialised readers (built from configs, no downloads) with the packaged MiniLM tokenizer."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from readers.base import ReaderConfig, ReaderPassage

hf_logging.set_verbosity_error()
WIDTH = 32


@pytest.fixture(scope="session")
def bert_tokenizer():
    from core.models import _minilm_path
    return AutoTokenizer.from_pretrained(_minilm_path())


def _bert_cfg(vocab: int, **kw) -> BertConfig:
    return BertConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                      vocab_size=vocab, max_position_embeddings=128, **kw)


def build_seq2seq(arch: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "bert2bert":
        model = EncoderDecoderModel(encoder=BertModel(_bert_cfg(vocab)),
                                    decoder=BertLMHeadModel(_bert_cfg(vocab, is_decoder=True, add_cross_attention=True)))
        for cfg in (model.config, model.generation_config):
            cfg.decoder_start_token_id = tokenizer.cls_token_id
            cfg.eos_token_id = tokenizer.sep_token_id
            cfg.pad_token_id = tokenizer.pad_token_id
        model.config.vocab_size = vocab
    elif arch == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=WIDTH, d_kv=16, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=2,
            decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.sep_token_id))
    elif arch == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.sep_token_id,
            forced_eos_token_id=None))
    else:
        raise ValueError(arch)
    return model.eval()


def build_causal(arch: str, tokenizer, seed: int = 0, positions: int = 256):
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=WIDTH, n_layer=1, n_head=2, n_positions=positions,
                                           bos_token_id=None, eos_token_id=None))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=positions))
    else:
        raise ValueError(arch)
    return model.eval()


def passage(key: str, text: str, title: str = "T") -> ReaderPassage:
    return ReaderPassage(key, title, text, doc_id=key.split("#")[0])


PASSAGES = [passage("d1#0", "Paris is the capital and largest city of France, on the Seine.", "Paris"),
            passage("d2#1", "Berlin is the capital of Germany and its most populous city.", "Berlin"),
            passage("d3#2", "The cat is a small domesticated carnivorous mammal kept as a pet.", "Cat")]


@pytest.fixture
def small_config() -> ReaderConfig:
    return ReaderConfig(max_passage_tokens=48, max_answer_tokens=8)


def pytest_configure(config):
    # EncoderDecoderModel warns on every call with labels that its loss moved into the wrapper in 4.12.
    config.addinivalue_line("filterwarnings", "ignore:Version v4.12.0 introduces:FutureWarning")
