"""`rag answer`: retrieve with any index, read with a reader (fid | causal), write KILT guesses with answers."""
from __future__ import annotations

import argparse
from pathlib import Path

from core.runinfo import RunRecord, record_path_for
from rag.commands.retrieve import add_gpu_flags, gpu_options
from rag.flags import positive_int
from readers.kinds import READER_KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("answer", help="answer KILT queries: retrieve, then read")
    p.add_argument("--index", required=True, type=Path, help="any index folder (bm25, dense, ...)")
    p.add_argument("--queries", required=True, type=Path, help="KILT JSONL (id, input)")
    p.add_argument("--out", required=True, type=Path,
                   help="KILT guesses JSONL (answer + provenance used; never one of the inputs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (default: off: an existing file is refused)")
    p.add_argument("--kind", choices=list(READER_KINDS), help="reader kind (default: from --model's run folder, else causal: Gemma-3-270M offline; fid needs T5/BART weights to be a reader)")
    p.add_argument("--model", help="a trained reader (run folder of `rag train reader`) or a base model "
                                   "(default: minilm-bert2bert for fid, gemma-3-270m for causal)")
    p.add_argument("--k", type=positive_int, default=5, help="passages per question")
    p.add_argument("--rerank", type=Path, help="re-rank the retrieved candidates with this re-ranker (a `rag train "
                                                "reranker` run or a CrossEncoder folder) before reading (default: off)")
    p.add_argument("--rerank-depth", type=positive_int, default=50,
                   help="with --rerank: candidates retrieved and re-ranked; the best --k are read")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per reading batch")
    p.add_argument("--max-passage-tokens", type=positive_int, help="tokens per passage (default: the reader's)")
    p.add_argument("--max-answer-tokens", type=positive_int, help="longest answer generated")
    p.add_argument("--num-beams", type=positive_int, help="beam size (default 1: greedy)")
    p.add_argument("--device", help="torch device")
    add_gpu_flags(p)
    p.set_defaults(func=run_answer)


def run_answer(args: argparse.Namespace) -> int:
    from core.io import output_lock
    from core.models import check_device
    from rag.commands.retrieve import check_outputs

    check_device(args.device)  # before any model loads
    with output_lock(args.out):  # a second run writing the same --out fails at once
        check_outputs(args)
        return _answer(args)


def _answer(args: argparse.Namespace) -> int:
    from core.io import write_jsonl
    from core.tasks import guess_rows, load_queries
    from readers.base import ReaderPassage, load_reader
    from retrievers import open_retriever
    from retrievers.base import retrieve_queries

    record = RunRecord("answer", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if k != "func"})
    gpu = gpu_options(args)  # before anything loads
    queries = load_queries(args.queries)
    with record.timed("load_s"):
        retriever = open_retriever(args.index, **gpu)
        reranker = None
        if args.rerank:  # before the reader: a wrong folder fails before the expensive load
            from retrievers.rerank import load_reranker
            reranker = load_reranker(args.rerank, device=args.device)
        reader = load_reader(args.kind, args.model, device=args.device, for_inference=True, config_overrides={
            "max_passage_tokens": args.max_passage_tokens, "max_answer_tokens": args.max_answer_tokens,
            "num_beams": args.num_beams})
    with record.timed("retrieve_s"):
        depth = max(args.k, args.rerank_depth) if args.rerank else args.k
        rankings = retrieve_queries(retriever, [q.text for q in queries], depth)
    if reranker is not None:
        from retrievers.rerank import rerank_hits
        with record.timed("rerank_s"):
            rankings = rerank_hits(reranker, [q.text for q in queries], rankings, k=args.k)
    passages = [[ReaderPassage.from_hit(h) for h in hits] for hits in rankings]
    with record.timed("read_s"):
        answers = reader.answer_with_meta([q.text for q in queries], passages, args.batch_size)
    rows = guess_rows(queries, rankings, [a for a, _ in answers])
    for row, (_, meta) in zip(rows, answers):
        if meta.get("no_passages"):
            row["meta"] = {"no_passages": True}
    write_jsonl(args.out, rows)
    no_passages = sum(1 for _, m in answers if m.get("no_passages"))
    record.extra.update({"reader": reader.kind, "truncated_passages": reader.stats.get("truncated_passages", 0),
                         "no_passages": no_passages, "questions": len(queries)})
    record.write(record_path_for(args.out))
    print(f"wrote {len(queries)} answers to {args.out} ({reader.kind} reader; "
          f"{record.extra['truncated_passages']} passages truncated, {no_passages} questions without passages)")
    return 0
