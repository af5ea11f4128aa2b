"""Fusion-in-Decoder over any HF seq2seq model.

Each (question, passage) pair is encoded separately by the encoder; the encoder states of a
question's passages are concatenated along the sequence and the decoder attends to all of them
(Izacard & Grave, 2021). Works with EncoderDecoderModel (the warm-started MiniLM bert2bert: decoder
starts at [CLS], labels are the target tokens and [SEP]), T5 and BART.

Denoising objective for CIT (`passage_nll`): span corruption with sentinels, the mask seeded by the
passage key. Sentinels follow the tokenizer: T5 `<extra_id_i>` (input and target), BART one
`<mask>` per span with the whole passage as target (text infilling), BERT vocabularies `[MASK]` in
the input and `[unused i]` before span i in the target.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from readers.base import (
    BaseReader,
    ReaderConfig,
    ReaderPassage,
    model_max_positions,
    random_spans_mask,
    stable_seed,
    token_nll,
)

log = logging.getLogger(__name__)
# EncoderDecoderModel warns on every call with labels that the loss moved into the wrapper (since 4.12).
warnings.filterwarnings("ignore", message="Version v4.12.0 introduces", category=FutureWarning)


def pick_sentinels(tokenizer: Any, n: int = 100) -> tuple[str, list[int], list[int]]:
    """(style, input sentinel ids, target sentinel ids); style "spans" (T5-like) or "infill" (BART-like)."""
    vocab = tokenizer.get_vocab()
    if "<extra_id_0>" in vocab:
        ids = [vocab[f"<extra_id_{i}>"] for i in range(n) if f"<extra_id_{i}>" in vocab]
        return "spans", ids, ids
    if tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id is not None:
        return "infill", [tokenizer.mask_token_id], []
    unused = [vocab[f"[unused{i}]"] for i in range(n) if f"[unused{i}]" in vocab]
    mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
    if unused:
        return "spans", [mask], unused
    return "spans", [mask], [mask]


class FiDReader(BaseReader):
    kind = "fid"
    default_model = "minilm-bert2bert"

    @staticmethod
    def load_base(name: str | None) -> tuple[torch.nn.Module, Any]:
        from core.models import load_seq2seq
        return load_seq2seq(name)

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: ReaderConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        cfg = model.config
        gen = getattr(model, "generation_config", None)
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = next((t for t in (getattr(cfg, "bos_token_id", None), tokenizer.bos_token_id,
                                      tokenizer.cls_token_id, tokenizer.pad_token_id) if t is not None), 0)
            log.warning("the seq2seq model has no decoder start token; using id %d", start)
            cfg.decoder_start_token_id = start
            if gen is not None:
                gen.decoder_start_token_id = start
        self.decoder_start = int(start)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = 0
            log.warning("the tokenizer has no pad token; padding with id 0")
        self.pad_id = int(pad)
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = self.pad_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        self.eos_id = int(eos) if eos is not None else None
        if gen is not None:
            if gen.pad_token_id is None:
                gen.pad_token_id = self.pad_id
            if gen.eos_token_id is None and self.eos_id is not None:
                gen.eos_token_id = self.eos_id
        self.style, self.sentinels_in, self.sentinels_out = pick_sentinels(tokenizer)
        encoder_config = getattr(cfg, "encoder", cfg)
        limit = model_max_positions(encoder_config)
        self.max_input = min(self.config.max_passage_tokens, limit) if limit else self.config.max_passage_tokens

    def denoising_objective(self) -> str:
        return f"span-corruption/{self.style}"

    # ------------------------------------------------------------------ inputs
    def _wrap(self, ids: list[int], budget: int) -> list[int]:
        room = budget - len(self.prefix) - len(self.suffix)
        if len(ids) > room:
            self.stats["truncated_passages"] += 1
            ids = ids[:max(room, 1)]
        return self.prefix + ids + self.suffix

    def _pair_ids(self, question: str, passage: ReaderPassage | None) -> list[int]:
        q = self.tokens(f"question: {question}", self.config.max_question_tokens, "truncated_questions")
        if passage is None:
            return self._wrap(q, self.max_input)
        return self._wrap(q + self.tokens(f" title: {passage.title} context: {passage.text}", None), self.max_input)

    def _pad(self, rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def encode(self, questions: Sequence[str], passages_per_question: Sequence[Sequence[ReaderPassage]]
               ) -> tuple[BaseModelOutput, torch.Tensor]:
        """Encode each (question, passage) separately; concatenate each question's states (the fusion)."""
        rows, counts = [], []
        for q, ps in zip(questions, passages_per_question):
            if not ps:
                self.stats["no_passages"] += 1
            group = [self._pair_ids(q, p) for p in ps] or [self._pair_ids(q, None)]
            rows.extend(group)
            counts.append(len(group))
        ids, mask = self._pad(rows, self.pad_id)
        states = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        fused, fused_mask, start = [], [], 0
        for n in counts:
            fused.append(states[start:start + n].reshape(-1, states.shape[-1]))
            fused_mask.append(mask[start:start + n].reshape(-1))
            start += n
        width = max(f.shape[0] for f in fused)
        hidden = states.new_zeros((len(counts), width, states.shape[-1]))
        attn = mask.new_zeros((len(counts), width))
        for i, (f, m) in enumerate(zip(fused, fused_mask)):
            hidden[i, :f.shape[0]] = f
            attn[i, :m.shape[0]] = m
        return BaseModelOutput(last_hidden_state=hidden), attn

    def label_ids(self, text: str) -> list[int]:
        """Target tokens + EOS; a leading decoder-start token ([CLS] for bert2bert) is dropped."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if ids and ids[0] == self.decoder_start and self.decoder_start != self.eos_id:
            ids = ids[1:]
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        limit = self.config.max_answer_tokens
        if len(ids) > limit:
            ids = ids[:limit - 1] + ids[-1:]
        return ids

    def _labels(self, rows: list[list[int]]) -> torch.Tensor:
        labels, mask = self._pad(rows, self.pad_id)
        return labels.masked_fill(mask == 0, -100)

    # ------------------------------------------------------------------ reader API
    def qa_loss(self, questions, passages_per_question, answers) -> torch.Tensor:
        encoder_outputs, attn = self.encode(questions, passages_per_question)
        labels = self._labels([self.label_ids(a) for a in answers])
        return self.model(encoder_outputs=encoder_outputs, attention_mask=attn, labels=labels).loss

    def _generate(self, questions, passages) -> list[str]:
        encoder_outputs, attn = self.encode(questions, passages)
        out = self.model.generate(encoder_outputs=encoder_outputs, attention_mask=attn,
                                  max_new_tokens=self.config.max_answer_tokens, num_beams=self.config.num_beams,
                                  decoder_start_token_id=self.decoder_start, do_sample=False)
        return [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------ denoising (CIT)
    def denoising_pair(self, passage: ReaderPassage) -> tuple[list[int], list[int]]:
        """(corrupted input ids, target ids) for a passage; deterministic given its key."""
        room = self.max_input - len(self.prefix) - len(self.suffix)
        ids = self.tokens(f"{passage.title}: {passage.text}" if passage.title else passage.text, room,
                          count_as=None)
        rng = np.random.default_rng(stable_seed(passage.key, self.config.corruption_seed))
        mask = random_spans_mask(len(ids), self.config.noise_density, self.config.mean_span, rng)
        source, target, span = [], [], -1
        for i, (tok, noisy) in enumerate(zip(ids, mask)):
            if noisy and (i == 0 or not mask[i - 1]):
                span += 1
                source.append(self.sentinels_in[span % len(self.sentinels_in)])
                if self.style == "spans":
                    target.append(self.sentinels_out[span % len(self.sentinels_out)])
            if not noisy:
                source.append(tok)
            elif self.style == "spans":
                target.append(tok)
        if self.style == "infill":
            target = list(ids)
        if self.eos_id is not None:
            target.append(self.eos_id)
        return self.prefix + source + self.suffix, target

    def passage_nll(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        """Per-passage mean token NLL of the denoising target (grad flows when the model trains)."""
        pairs = [self.denoising_pair(p) for p in passages]
        ids, mask = self._pad([s for s, _ in pairs], self.pad_id)
        labels = self._labels([t for _, t in pairs])
        logits = self.model(input_ids=ids, attention_mask=mask, labels=labels).logits
        return token_nll(logits, labels)
