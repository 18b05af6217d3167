"""The question-time half: a decoupled reader over the store.

The question runs through the input component once; the top-K passages' lower-layer states come from
the store (row groups only) and are decoded in one batch on the device; each [question; passage] is
re-encoded with global position and segment embeddings (the paper's §3.3) and the upper layers run on
all K sequences as one batch. The split and the codec come from the store's manifest, and a model whose
files differ from the store's fingerprint is refused: its upper layers would read states they never saw.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, AutoTokenizer

from pipeline.config import ConfigError, ModelConfig
from pipeline.model.encoder import LayeredEncoder, compute_dtype, pick_device
from pipeline.serve.checks import MAX_K, check_device, check_k, check_question  # noqa: F401  (public here too)
from pipeline.serve.state_reader import EncodedPassage, StateReader
from pipeline.codec.side_info import SideInfo
from storage.errors import UsageError
from storage.fs import Store

log = logging.getLogger(__name__)


class ModelMismatch(UsageError, ValueError):
    """The model is not the one whose lower layers produced the stored states."""


@dataclass(frozen=True)
class RuntimeConfig:
    model: str | None = None           # default: the model the store was built with
    version: int | None = None         # default: the newest version
    device: str = "auto"
    max_question_tokens: int = 64      # the paper's long setting; longer questions are truncated
    max_answer_tokens: int = 30
    verify: str = "size"               # shard check once per reader: "size" (serving) or "checksum"
    nprobe: int | None = None

    def __post_init__(self):
        check_device(self.device)
        if self.max_question_tokens < 3 or self.max_answer_tokens < 1:
            raise ConfigError("max_question_tokens must be at least 3 and max_answer_tokens at least 1")


@dataclass
class Span:
    text: str
    start: int          # character offsets into PassageResult.text
    end: int
    score: float        # start logit + end logit
    token_start: int    # indices into PassageResult.token_ids
    token_end: int


@dataclass
class PassageResult:
    id: int
    title: str | None
    dpr_score: float | None
    text: str                 # the passage text, detokenised from the stored token ids
    token_ids: np.ndarray     # the stored passage tokens used (after any truncation)
    states: np.ndarray        # [question_tokens + len(token_ids), hidden] final states, float32
    question_tokens: int
    truncated: int            # passage tokens dropped so [question; passage] fits the positions
    span: Span | None = None


@dataclass
class Answer:
    question: str
    passages: list[PassageResult]
    best: PassageResult | None = None   # the passage holding the best span (QA checkpoints only)


def check_model(fingerprint: dict, name: str) -> ModelConfig:
    """Refuse a model whose files (local) or name and revision (hub) differ from the store's."""
    from pipeline.model.encoder import model_revision

    cfg = ModelConfig(name=name, layers=int(fingerprint["layers"]))
    revision = model_revision(cfg)
    stored = fingerprint["model_revision"]
    local = os.path.isdir(cfg.path)
    if revision != stored or (not local and name != fingerprint["model"]):
        raise ModelMismatch(f"model {name} ({revision}) is not the one this store was built with "
                            f"({fingerprint['model']}, {stored}): its upper layers would read states another "
                            f"model produced. Pass --model with the store's checkpoint, or rebuild the store")
    return cfg


class DecoupledReader:
    """Question + top-K stored passages -> final token states (and answer spans with a QA head)."""

    def __init__(self, store: Store, cfg: RuntimeConfig = RuntimeConfig()):
        self.store, self.cfg = store, cfg
        self.states = StateReader(store, cfg.version, verify=cfg.verify)
        fp = self.states.manifest.fingerprint
        self.model_cfg = check_model(fp, cfg.model or fp["model"])
        self.device = pick_device(cfg.device)
        dtype = compute_dtype(self.device)
        path = self.model_cfg.path
        archs = AutoConfig.from_pretrained(path).architectures or []
        self.qa_head = None
        if any(a.endswith("ForQuestionAnswering") for a in archs):
            qa = AutoModelForQuestionAnswering.from_pretrained(path, dtype=dtype)
            self.qa_head = qa.qa_outputs.eval().requires_grad_(False).to(self.device)
            base = qa.base_model
        else:
            base = AutoModel.from_pretrained(path, dtype=dtype)
        self.encoder = LayeredEncoder(self.model_cfg, self.device, keep_upper=True, model=base)
        if self.encoder.total_layers <= self.model_cfg.layers:
            raise ConfigError(f"the store's input component is all {self.encoder.total_layers} layers of "
                              f"{self.model_cfg.name}: no cross component is left to run")
        if self.states.codec.hidden != self.encoder.hidden:
            raise ModelMismatch(f"the store's states are {self.states.codec.hidden} wide, "
                                f"{self.model_cfg.name} is {self.encoder.hidden}")
        self.tok = AutoTokenizer.from_pretrained(path, use_fast=True)
        self._reencoding()
        self._searcher = None

    def _reencoding(self) -> None:
        """§3.3: global position and segment embeddings for the cross component, initialised from
        the input component's position and token-type embeddings (copies: a trained decoupled
        checkpoint would bring its own)."""
        emb = self.encoder.embeddings
        table = getattr(emb, "position_embeddings", None)
        if not isinstance(table, torch.nn.Embedding):
            raise ConfigError(f"model {self.model_cfg.name} ({self.encoder.architecture}) has no absolute position "
                              f"embeddings to re-encode [question; passage] with (§3.3), so `answer` refuses it; "
                              f"its stored states can still be read with `lookup`")
        if table.embedding_dim != self.encoder.hidden:
            raise ConfigError(f"model {self.model_cfg.name} ({self.encoder.architecture}) has {table.embedding_dim}-wide "
                              f"position embeddings for {self.encoder.hidden}-wide states (ELECTRA's up-projected "
                              f"embeddings): `answer` cannot re-encode [question; passage] with them, so it refuses")
        self.global_position = table.weight.detach().clone()
        types = getattr(emb, "token_type_embeddings", None)
        self.global_segment = types.weight.detach().clone() if types is not None else None
        pad = getattr(emb, "padding_idx", None)  # RoBERTa numbers positions from padding_idx + 1
        self.position_offset = pad + 1 if pad is not None else 0
        self.max_positions = self.global_position.shape[0] - self.position_offset

    # ---------------------------------------------------------------- the fast path

    def question_ids(self, question: str) -> np.ndarray:
        enc = self.tok(check_question(question), truncation=True, max_length=self.cfg.max_question_tokens)
        return np.asarray(enc["input_ids"], dtype=np.int64)

    def lower_question(self, ids: np.ndarray) -> torch.Tensor:
        """[n_q, hidden]: the question through the input component, once for all K passages."""
        t = torch.as_tensor(ids, device=self.device)[None]
        return self.encoder.embed_and_lower(t, torch.zeros_like(t), torch.ones_like(t))[0]

    def decode(self, encoded: list[EncodedPassage]) -> list[torch.Tensor]:
        """All K passages' codes in one decode on the device, split back per passage."""
        codes = torch.from_numpy(np.concatenate([e.codes for e in encoded])).to(self.device)
        scales = None
        if encoded[0].scales is not None:
            scales = torch.from_numpy(np.concatenate([e.scales for e in encoded])).to(self.device)
        states = self.states.codec.decode_torch(codes, scales, SideInfo.of([e.token_ids for e in encoded]))
        return list(torch.split(states, [len(e.codes) for e in encoded]))

    @torch.inference_mode()
    def cross(self, question: torch.Tensor, passages: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """[question; passage_i] re-encoded, then the upper layers on all K as one batch.

        Returns states [K, L, hidden] (rows padded past their length) and each row's length."""
        nq = question.shape[0]
        room = self.max_positions - nq
        if room < 1:
            raise ConfigError(f"a {nq}-token question leaves no room in {self.max_positions} positions")
        passages = [p[:room] for p in passages]
        lengths = [nq + p.shape[0] for p in passages]
        k, width, hidden = len(passages), max(lengths), question.shape[1]
        dtype = self.encoder.dtype
        h = torch.zeros(k, width, hidden, device=self.device, dtype=dtype)
        h[:, :nq] = question.to(dtype)
        slots = torch.arange(width, device=self.device)[None, :]
        ends = torch.as_tensor(lengths, device=self.device)[:, None]
        in_passage = (slots >= nq) & (slots < ends)
        h[in_passage] = torch.cat(passages).to(dtype)  # row-major order = the passages' concatenation
        positions = torch.arange(width, device=self.device) + self.position_offset
        h += self.global_position[positions].to(dtype)[None]
        if self.global_segment is not None:
            segment = 1 if self.global_segment.shape[0] > 1 else 0
            h += self.global_segment[in_passage.long() * segment].to(dtype)
        mask = (slots < ends).long()
        out = self.encoder.run_layers(h, mask, self.model_cfg.layers, self.encoder.total_layers)
        return out, lengths

    def final_states(self, question: str, passage_ids: list[int]) -> tuple[list[EncodedPassage], torch.Tensor,
                                                                            list[int], int]:
        """Question -> fetch -> decode -> cross: what a serving call costs. Passages absent from the
        store are left out; the order of `passage_ids` is kept."""
        return self.final_states_for_ids(self.question_ids(question), passage_ids)

    def final_states_for_ids(self, q_ids: np.ndarray, passage_ids: list[int]):
        """`final_states` from question token ids ([CLS] q [SEP])."""
        hq = self.lower_question(q_ids)
        found = self.states.get_encoded(passage_ids)
        encoded = [found[int(i)] for i in passage_ids if int(i) in found]
        if not encoded:
            raise ConfigError(f"none of the passages {list(passage_ids)[:10]} is in version {self.states.version}")
        out, lengths = self.cross(hq, self.decode(encoded))
        return encoded, out, lengths, len(q_ids)

    # ---------------------------------------------------------------- results

    def read(self, question: str, passage_ids: list[int], titles: dict[int, str] | None = None,
             scores: dict[int, float] | None = None) -> Answer:
        encoded, out, lengths, nq = self.final_states(question, passage_ids)
        spans = self._spans(out, lengths, nq, encoded) if self.qa_head is not None else [None] * len(encoded)
        results = []
        for i, (e, span) in enumerate(zip(encoded, spans)):
            used = e.token_ids[:lengths[i] - nq]
            text, offsets = self._text(used)
            results.append(PassageResult(
                id=e.id, title=(titles or {}).get(e.id), dpr_score=(scores or {}).get(e.id), text=text,
                token_ids=used, states=out[i, :lengths[i]].float().cpu().numpy(), question_tokens=nq,
                truncated=len(e.token_ids) - len(used), span=self._locate(span, used, text, offsets)))
        with_span = [r for r in results if r.span is not None]
        best = max(with_span, key=lambda r: r.span.score) if with_span else None
        return Answer(question=question.strip(), passages=results, best=best)

    def answer(self, question: str, k: int = 10) -> Answer:
        """DPR top-k from the store's index, then `read`."""
        from pipeline.serve.searcher import Searcher

        question, k = check_question(question), check_k(k)
        if self._searcher is None:
            self._searcher = Searcher(self.store, self.states.version, self.cfg.device, self.cfg.nprobe)
        hits = self._searcher.search([question], k)[0]
        return self.read(question, [h.id for h in hits], {h.id: h.title for h in hits},
                         {h.id: h.score for h in hits})

    def _text_range(self, ids: np.ndarray) -> tuple[int, int]:
        """The text segment of a stored [CLS] title [SEP] text [SEP] (or [CLS] text [SEP]) passage."""
        seps = np.flatnonzero(ids == self.tok.sep_token_id)
        start = 1 if ids.size and ids[0] == self.tok.cls_token_id else 0
        if seps.size >= 2:
            start = int(seps[0]) + 1
            while start < ids.size and ids[start] == self.tok.sep_token_id:  # RoBERTa's </s></s>
                start += 1
        stop = int(seps[-1]) if seps.size and seps[-1] >= start else ids.size
        return start, stop

    def _text(self, ids: np.ndarray) -> tuple[str, list[tuple[int, int]] | None]:
        """Detokenised text segment and each of its tokens' character offsets (None when the text does
        not tokenise back to the same ids; spans are then located by search)."""
        a, b = self._text_range(ids)
        piece = ids[a:b].tolist()
        text = self.tok.decode(piece, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return text, (enc["offset_mapping"] if enc["input_ids"] == piece else None)

    @torch.inference_mode()
    def _spans(self, out: torch.Tensor, lengths: list[int], nq: int,
               encoded: list[EncodedPassage]) -> list[tuple[int, int, float] | None]:
        """Best (start, end) token of each passage's text segment: start + end logit, end - start < max."""
        logits = self.qa_head(out).float()
        found = []
        for i, e in enumerate(encoded):
            a, b = self._text_range(e.token_ids[:lengths[i] - nq])
            if b <= a:
                found.append(None)
                continue
            start, end = logits[i, nq + a:nq + b, 0], logits[i, nq + a:nq + b, 1]
            score = start[:, None] + end[None, :]
            m = score.shape[0]
            band = torch.ones(m, m, dtype=torch.bool, device=score.device).triu()
            band &= ~torch.ones_like(band).triu(self.cfg.max_answer_tokens)
            score = score.masked_fill(~band, float("-inf"))
            flat = int(score.argmax())
            found.append((a + flat // m, a + flat % m, float(score.view(-1)[flat])))
        return found

    def _locate(self, span, ids: np.ndarray, text: str, offsets) -> Span | None:
        if span is None:
            return None
        s, e, score = span
        a, _ = self._text_range(ids)
        if offsets is not None:
            start, end = offsets[s - a][0], offsets[e - a][1]
        else:
            wanted = self.tok.decode(ids[s:e + 1].tolist(), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).strip()
            start = text.find(wanted)
            if start < 0:
                log.warning("passage: answer span %r not found in its detokenised text", wanted)
                return None
            end = start + len(wanted)
        return Span(text=text[start:end], start=start, end=end, score=score, token_start=s, token_end=e)
