"""Commands on a store's DPR index: plan-index, index, search, answer."""
from __future__ import annotations

import json

from jobs.cli import options as o
from pipeline.schema import ConfigError

EXIT_FAILED = 1


def cmd_plan_index(a) -> int:
    from pipeline.index.plan import parse_bytes, plan_index

    try:
        plan = plan_index(a.vectors, a.dim, parse_bytes(a.memory))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if a.json:
        print(json.dumps(plan.__dict__, indent=1))
    else:
        print(plan.render())
    return 0 if plan.fits else EXIT_FAILED


def cmd_index(a) -> int:
    from pipeline.job_requests import INDEX_SCHEMA

    return index_and_report(o.request(a, INDEX_SCHEMA), a.dry_run, a.json)


def index_and_report(request: dict, dry_run: bool, as_json: bool) -> int:
    """A reindex from its request (CLI flags or `jobs.index`'s YAML), or its plan."""
    from pipeline.flows.reindex import plan_reindex, reindex
    from pipeline.job_requests import reindex_config

    cfg = reindex_config(request)
    if dry_run:
        plan = plan_reindex(cfg)
        print(json.dumps(plan.to_dict(), indent=1) if as_json else plan.render())
        return 0
    print(reindex(cfg).render())
    return 0


def cmd_search(a) -> int:
    from pipeline.serve.checks import MAX_SEARCH_K, check_k, check_question
    from pipeline.serve.searcher import Searcher

    question, k = check_question(a.question), check_k(a.k, MAX_SEARCH_K)  # before loading the index and encoder
    searcher = Searcher(o.store(a), a.version, a.device, a.nprobe)
    hits = searcher.search([question], k, with_states=a.with_states or bool(a.out))[0]
    if a.json:
        print(json.dumps([{"id": h.id, "score": h.score, "title": h.title,
                           "n_tokens": int(h.states.token_ids.size) if h.states else None} for h in hits], indent=1))
    else:
        print(f"version {searcher.manifest.version}, top {len(hits)} for {a.question!r}:")
        for rank, h in enumerate(hits, 1):
            extra = f"  [{h.states.states.shape[0]} x {h.states.states.shape[1]} states]" if h.states else ""
            print(f"{rank:3d}. {h.id:>10}  {h.score:8.4f}  {h.title}{extra}")
    if a.out:
        arrays = {}
        for h in hits:
            if h.states:
                arrays[f"token_ids_{h.id}"] = h.states.token_ids
                arrays[f"states_{h.id}"] = h.states.states
        o.write_npz(a.out, arrays)
    return 0


def cmd_answer(a) -> int:
    from pipeline.serve.checks import check_k, check_question
    from pipeline.serve.qa_reader import DecoupledReader, RuntimeConfig

    question, k = check_question(a.question), check_k(a.k)  # before loading the model
    cfg = RuntimeConfig(model=a.model, version=a.version, device=a.device, nprobe=a.nprobe,
                        max_answer_tokens=a.max_answer_tokens)
    reader = DecoupledReader(o.store(a), cfg)
    ans = reader.answer(question, k)
    if a.json:
        print(json.dumps({"version": reader.states.version, "question": ans.question, "passages": [
            {"id": p.id, "title": p.title, "dpr_score": p.dpr_score, "text": p.text, "tokens": int(p.token_ids.size),
             "truncated": p.truncated, "span": None if p.span is None else {
                 "text": p.span.text, "start": p.span.start, "end": p.span.end, "score": p.span.score}}
            for p in ans.passages], "best": None if ans.best is None else ans.best.id}, indent=1))
        return 0
    fp = reader.states.manifest.fingerprint
    print(f"version {reader.states.version}, {fp['model']} split {reader.model_cfg.layers}-"
          f"{reader.encoder.total_layers - reader.model_cfg.layers}, top {len(ans.passages)} for {ans.question!r}:")
    for rank, p in enumerate(ans.passages, 1):
        span = f'  "{p.span.text}" ({p.span.score:.2f})' if p.span else ""
        score = f"{p.dpr_score:8.4f}" if p.dpr_score is not None else f"{'-':>8}"
        print(f"{rank:3d}. {p.id:>10}  {score}  {p.title or ''}{span}")
        print(f"       {snippet(p.text)}")
    if ans.best is not None:
        print(f'answer: "{ans.best.span.text}" (passage {ans.best.id}, {ans.best.title})')
    elif reader.qa_head is None:
        print(f"no QA head in {reader.model_cfg.name}: the passages above are ranked by DPR and read by the upper "
              f"layers, without answer spans. For spans, build the store from a checkpoint with a QA head "
              f"(precompute run --model CKPT, an ...ForQuestionAnswering model) and answer with it (--model CKPT, "
              f"default: the store's model)")
    return 0


def snippet(text: str, width: int = 100) -> str:
    """The start of a passage on one line: enough to tell the passages apart."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1].rstrip() + "…"


def add_plan_index(sub) -> None:
    pi = o.command(sub, "plan-index", cmd_plan_index,
                   "propose a FAISS index for N vectors in a memory budget, with the arithmetic")
    pi.add_argument("--vectors", type=int, required=True)
    pi.add_argument("--dim", type=int, default=768)
    pi.add_argument("--memory", required=True, help="e.g. 64GB or 48GiB")
    pi.add_argument("--json", action="store_true")


def add_search(sub) -> None:
    se = o.command(sub, "search", cmd_search, "DPR search over a store version: ids, scores, titles (and stored states)",
                   sections=(o.add_store,))
    se.add_argument("question")
    se.add_argument("-k", type=int, default=10, help="passages to return (default 10)")
    se.add_argument("--with-states", action="store_true", help="also fetch each hit's stored token states")
    se.add_argument("--out", default=None, help="write the hits' token ids and states to this .npz")
    o.add_reading(se)


def add_answer(sub) -> None:
    an = o.command(sub, "answer", cmd_answer, "the decoupled reader: DPR top-k, stored states, upper layers (and spans)",
                   "Runs the question through the input component, fetches the top-k passages' stored states, "
                   "re-encodes each [question; passage] and runs the upper layers on all k as one batch. With a QA "
                   "checkpoint it prints the best span per passage and overall.", (o.add_store,))
    an.add_argument("question")
    an.add_argument("-k", type=int, default=10, help="passages to read (default 10, at most 100)")
    an.add_argument("--model", default=None, help="the reader checkpoint (default: the model the store was built "
                    "with; another model's files are refused)")
    an.add_argument("--max-answer-tokens", type=int, default=30, help="longest span in tokens (default 30)")
    o.add_reading(an, "store version (default: newest)")


def add_index(sub) -> None:
    ix = o.command(sub, "index", cmd_index, "rebuild the FAISS index of the newest version from its stored embeddings",
                   "Train a FAISS index (any factory string; see plan-index) on the newest version's DPR embeddings, "
                   "without tombstoned rows, add every shard in Ray tasks, and commit it as a new version over the "
                   "same shards.", (o.add_store,))
    ix.add_argument("--factory", required=True, help="FAISS factory string, e.g. IVF4096,SQ8 (inner product)")
    ix.add_argument("--train-sample", type=int, default=100_000, help="vectors to train on (default 100000)")
    ix.add_argument("--nprobe", type=int, default=16, help="default nprobe recorded for search")
    ix.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    ix.add_argument("--dry-run", action="store_true", help="print vectors, shards and index size; do nothing")
    ix.add_argument("--json", action="store_true")
