"""A decoder-only reader: the passages go into the prompt, the loss is on the answer tokens only.

Prompt:
    Passage 1: TITLE: TEXT
    ...
    Question: QUESTION
    Answer: ANSWER<eos>

The likelihood CIT constrains (`passage_nll`), chosen by `ReaderConfig.cit_proxy`:

- `span` (the default; decoder-only masked span prediction, the analogue of the span corruption an
  Atlas/T5 reader is pre-trained on): the salient spans of the passage (years, numbers, capitalised
  multi-word names: `readers.cloze.salient_spans`, at most `max_spans`, found in the passage as cut to
  `max_passage_tokens`) are replaced by numbered blanks, and the model reads the blanked passage and then
  writes the spans after their numbers:

      TITLE: ... the ____ (1) river ... in ____ (2) ...
      (1) Seine
      (2) 1789

  Only the span tokens (` Seine`, ` 1789`) are scored (the blanked passage and the `\\n(i)` markers are
  context); ℓ(d) is the mean over spans of each span's mean token NLL, so a long name weighs as much as a
  year. A passage without a salient span has no value: its entry is NaN, it is counted in
  `stats["cit_no_span_passages"]`, and CIT skips it. Only the logits at span positions are computed.
- `passage`: plain next-token NLL over the passage tokens (`TITLE: TEXT`, after the BOS token where the
  tokenizer has one): what the reader's pre-training optimised, dominated by the many tokens that carry no
  answer.

Passages are cut so the prompt fits the model's positions (each cut is counted). A model without a
pad token pads with its EOS token (warned); generation pads on the left.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from readers.base import BaseReader, ReaderConfig, ReaderPassage, model_max_positions, token_nll

log = logging.getLogger(__name__)


def load_causal(name: str | None = None, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): Gemma-3-270M by default (alias "gemma-3-270m"), or any HF causal LM id/path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.gemma import GEMMA_ALIAS, gemma_path
    from core.models import resolve_model

    name = name or GEMMA_ALIAS
    path = gemma_path() if name == GEMMA_ALIAS else resolve_model(name)
    check_causal_lm(name, path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return model, tokenizer


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "WithLMHead")


def check_causal_lm(name: str, path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before loading weights, a model that is not a causal LM: an encoder-decoder, or an encoder such as
    a BERT sentence encoder, which AutoModelForCausalLM would load with a new, random LM head and bidirectional
    attention (training "works" and the reader is useless). Judged from the config: its `architectures`, and
    for encoder families (bert, roberta, ...) its `is_decoder` flag."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from core.errors import RagError

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    shown = ", ".join(architectures) or config.model_type
    advice = "the causal reader needs a decoder-only LM (default gemma-3-270m)"
    if getattr(config, "is_encoder_decoder", False):
        raise RagError(f"model {name}: an encoder-decoder ({shown}), not a causal LM; {advice}, "
                       "or use --kind fid for seq2seq models")
    if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise RagError(f"model {name}: {shown} has no causal-LM head; {advice}")
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise RagError(f"model {name}: a {config.model_type} encoder ({shown}) without is_decoder, whose attention "
                       f"sees the whole text; {advice}")


class CausalReader(BaseReader):
    kind = "causal"
    default_model = "gemma-3-270m"
    load_base = staticmethod(load_causal)

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: ReaderConfig | None = None) -> None:
        super().__init__(model, tokenizer, config)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.eos_id = int(eos) if eos is not None else None
        if tokenizer.pad_token_id is None:
            pad = self.eos_id if self.eos_id is not None else 0
            log.warning("the causal model has no pad token; padding with id %d (its EOS token)", pad)
            self.pad_id = int(pad)
        else:
            self.pad_id = int(tokenizer.pad_token_id)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.pad_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = self.pad_id
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and self.prefix else []
        self.max_positions = model_max_positions(model.config)
        self._keeps_logits = True

    proxies = ("span", "passage")

    def denoising_objective(self) -> str:
        return "masked-salient-span" if self.cit_proxy() == "span" else "next-token"

    # ------------------------------------------------------------------ prompts
    def _prompt(self, question: str, passages: Sequence[ReaderPassage]) -> list[int]:
        cfg = self.config
        q = self.tokens(f"Question: {question}\nAnswer:", cfg.max_question_tokens, "truncated_questions")
        per_passage = cfg.max_passage_tokens
        if self.max_positions and passages:
            room = self.max_positions - len(self.bos) - len(q) - cfg.max_answer_tokens - 8 * len(passages)
            per_passage = max(1, min(per_passage, room // len(passages)))
        if not passages:
            self.stats["no_passages"] += 1
        ids = list(self.bos)
        for i, p in enumerate(passages, 1):
            ids += self.tokens(f"Passage {i}: ", None) + self.tokens(f"{p.title}: {p.text}", per_passage)
            ids += self.tokens("\n", None)
        return ids + q

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.tokens(f" {answer}", self.config.max_answer_tokens - 1, count_as=None)
        return ids + ([self.eos_id] if self.eos_id is not None else [])

    # ------------------------------------------------------------------ reader API
    def _batch(self, rows: list[list[int]], labels: list[list[int]] | None, left: bool) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
            if labels is not None:
                lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if labels is not None:
            out["labels"] = lab.to(self.device)
        return out

    def _lm_nll(self, rows: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
        batch = self._batch(rows, labels, left=False)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_nll(logits[:, :-1], batch["labels"][:, 1:])

    def qa_loss(self, questions, passages_per_question, answers) -> torch.Tensor:
        rows, labels = [], []
        for q, ps, a in zip(questions, passages_per_question, answers):
            prompt, target = self._prompt(q, ps), self._answer_ids(a)
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        batch = self._batch(rows, labels, left=False)
        lab = batch["labels"][:, 1:]
        # logits only where some row predicts an answer token: the LM head over Gemma's 262k-token
        # vocabulary at every prompt position would dominate the step's time and memory
        keep = (lab != -100).any(dim=0).nonzero().squeeze(1)
        logits = self._logits(batch, keep)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 lab[:, keep].reshape(-1), ignore_index=-100)

    def _logits(self, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """Logits at the given sequence positions (`logits_to_keep`; full logits for models without it)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._keeps_logits:
            try:
                return self.model(**inputs, logits_to_keep=positions).logits
            except TypeError:  # a model whose forward does not take logits_to_keep
                self._keeps_logits = False
        return self.model(**inputs).logits[:, positions]

    def _generate(self, questions, passages) -> list[str]:
        batch = self._batch([self._prompt(q, ps) for q, ps in zip(questions, passages)], None, left=True)
        out = self.model.generate(**batch, max_new_tokens=self.config.max_answer_tokens, do_sample=False,
                                  num_beams=self.config.num_beams, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_id)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip().split("\n")[0].strip() for t in texts]

    def passage_nll(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        """ℓ(d) per passage under the configured proxy (see the module doc); NaN where `span` finds no span."""
        if self.cit_proxy() == "span":
            return self.span_nll(passages)
        return self.next_token_nll(passages)

    # ------------------------------------------------------------------ masked salient spans
    def _cut_text(self, passage: ReaderPassage, limit: int) -> str:
        """The passage text as far as `TITLE: TEXT` fits in `limit` tokens (character offsets of a fast
        tokenizer; else word by word)."""
        head = f"{passage.title}: " if passage.title else ""
        full = head + passage.text
        try:
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError, KeyError):
            ids, offsets = self.tokens(full, None, None), None
        if len(ids) <= limit:
            return passage.text
        if offsets is not None:
            return full[len(head):max(len(head), int(offsets[limit - 1][1]))]
        words = passage.text.split(" ")
        kept = 0
        while kept < len(words) and len(self.tokens(head + " ".join(words[:kept + 1]), None, None)) <= limit:
            kept += 1
        return " ".join(words[:kept])

    def span_inputs(self, passage: ReaderPassage) -> tuple[list[int], list[int]] | None:
        """(ids, span_of) of the masked-span row of a passage: `span_of[t]` is the 0-based span whose token
        ids[t] is, -1 for context. None when the passage has no salient span."""
        from readers.cloze import salient_spans

        room = (self.max_positions or 10**9) - len(self.bos)
        text = self._cut_text(passage, min(self.config.max_passage_tokens, room))
        spans = salient_spans(text, passage.title, self.config.max_spans)
        while spans:
            parts, pos = [], 0
            for i, (start, end, _, _) in enumerate(spans, 1):
                parts += [text[pos:start], f"____ ({i})"]
                pos = end
            parts.append(text[pos:])
            head = f"{passage.title}: " if passage.title else ""
            ids = self.bos + self.tokens(head + "".join(parts), None, None)
            span_of = [-1] * len(ids)
            for i, (_, _, span, _) in enumerate(spans, 1):
                marker, target = self.tokens(f"\n({i})", None, None), self.tokens(f" {span}", None, None)
                ids += marker + target
                span_of += [-1] * len(marker) + [i - 1] * len(target)
            if len(ids) <= (self.max_positions or 10**9):
                return ids, span_of
            spans = spans[:-1]  # blanks and answers past the model's positions: drop the last span
        return None

    def span_nll(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        """Masked-salient-span NLL per passage (mean over spans of the span's mean token NLL); NaN for a
        passage without a span (counted in stats["cit_no_span_passages"])."""
        rows, span_ofs, where = [], [], []
        for j, p in enumerate(passages):
            built = self.span_inputs(p)
            if built is None:
                self.stats["cit_no_span_passages"] += 1
                continue
            rows.append(built[0])
            span_ofs.append(built[1])
            where.append(j)
        out = torch.full((len(passages),), float("nan"), device=self.device)
        if not rows:
            return out
        labels = [[t if s >= 0 else -100 for t, s in zip(ids, so)] for ids, so in zip(rows, span_ofs)]
        batch = self._batch(rows, labels, left=False)
        width = batch["input_ids"].shape[1]
        sid = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, so in enumerate(span_ofs):
            sid[i, :len(so)] = torch.tensor(so, dtype=torch.long)
        lab, sid = batch["labels"][:, 1:], sid[:, 1:].to(self.device)
        keep = (lab != -100).any(dim=0).nonzero().squeeze(1)
        logits = self._logits(batch, keep)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), lab[:, keep], ignore_index=-100,
                                                reduction="none")                      # (rows, kept positions)
        sid = sid[:, keep]
        n_spans = int(sid.max()) + 1
        onehot = (sid.unsqueeze(-1) == torch.arange(n_spans, device=sid.device)).float()  # (rows, kept, spans)
        counts = onehot.sum(dim=1)
        per_span = (nll.unsqueeze(-1) * onehot).sum(dim=1) / counts.clamp(min=1.0)
        present = (counts > 0).float()
        value = (per_span * present).sum(dim=1) / present.sum(dim=1)
        return out.to(value.dtype).index_copy(0, torch.tensor(where, device=value.device), value)

    def next_token_nll(self, passages: Sequence[ReaderPassage]) -> torch.Tensor:
        """Plain next-token NLL over `TITLE: TEXT` (the `passage` proxy)."""
        room = (self.max_positions or 10**9) - len(self.bos)
        rows, labels = [], []
        for p in passages:
            ids = self.tokens(f"{p.title}: {p.text}" if p.title else p.text, min(self.config.max_passage_tokens, room),
                              count_as=None)
            row = self.bos + ids
            rows.append(row)
            labels.append([-100] + ids if self.bos else [-100] + ids[1:])  # the first token has no context
        return self._lm_nll(rows, labels)
