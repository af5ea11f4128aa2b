"""Corpus-swap generalisation harness: `rag eval corpus-swap --config SWAP.yaml --out DIR [--address ADDR]`.

A swap config names corpora (prepared, given by path, or derived from another with a transform of
eval/transforms.py), task files tied to them, and models (bm25, dense encoders
or run folders, generative retrievers, readers). The matrix is model x evaluated corpus x task; each cell
(retrieve, read, evaluate with the official KILT metrics) is one Ray task:

1. the driver prepares and derives the data (cheap, deterministic, cached under OUT/data);
2. every index the cells need is built once, as its own Ray task (one per (corpus, index kind, encoder),
   cached under OUT/indexes), so no two cells ever build the same index; a cell takes its index build's
   result as an argument, so Ray starts it as soon as its index exists;
3. cells run as Ray tasks with `num_cpus`/`num_gpus` from the model's config (GPUs only where the cluster
   has some), retried `max_retries` times on any exception or worker loss, then reported failed; the
   others carry on;
4. the driver appends each cell's row to OUT/results.jsonl as soon as the cell finishes (one O_APPEND
   write per row, fsynced); a rerun skips cells whose latest row is `ok` for the same spec (model settings and the
   content fingerprints of its weights, the index's manifest, corpus and task checksums, k, ks), so an interrupted
   or partly failed run resumes, and a cell whose model was trained further is recomputed (counted as stale);
5. OUT/table.md (all cells, then "original vs swapped" with CRP = swapped / baseline per metric),
   OUT/plots/*.png (each metric per model on every corpus; CRP per model) and OUT/summary.json.

Cell kinds live in CELL_KINDS (name -> CellKind(run, index)); adding one is one entry. A kind whose
module is not in this build (generative retrieval, readers) reports status "unavailable", never a fake
score. `workers=0` runs everything in this process without Ray (the reference the Ray path must match).
On a multi-node cluster, OUT must be on a filesystem every node sees.

Modules: config (the swap config: dataclasses, loading, validation), kinds (the CELL_KINDS registry), cells (data,
planning, index builds, the cell kinds, one cell), runner (results file, retries, local and Ray execution,
run_plan, run_swap), report (CRP, table, plots, summary.json), cli (`rag eval corpus-swap`).

The swap-config schema (every key, its type, default and meaning, and a full example): docs/swap-config.md.
"""
from rag.swap.cells import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_UNAVAILABLE,
    CellSpec,
    CorpusState,
    IndexSpec,
    SwapPlan,
    build_index,
    index_fingerprint,
    index_ready,
    materialize_data,
    model_fingerprints,
    plan_swap,
    reader_cell,
    retrieval_cell,
    run_cell,
    stale_reason,
    weights_fingerprint,
)
from rag.swap.config import (
    DEFAULT_METRICS,
    CorpusSpec,
    ModelSpec,
    SwapConfig,
    SwapConfigError,
    TaskSpec,
    load_swap_config,
    read_swap_file,
    swap_config_from_dict,
    validate_config,
)
from rag.swap.kinds import CELL_KINDS, CellKind, CellUnavailable
from rag.swap.report import (
                            PLOTS,
                            READER_METRICS,
                            SUMMARY,
                            TABLE,
                            corpus_relative,
                            format_swap_table,
                            pair_baselines,
                            write_plots,
                            write_report,
)
from rag.swap.runner import RESULTS, append_row, read_results, run_plan, run_swap

__all__ = [
    "CELL_KINDS", "DEFAULT_METRICS", "PLOTS", "READER_METRICS", "RESULTS", "STATUS_FAILED",
    "STATUS_OK", "STATUS_UNAVAILABLE", "SUMMARY", "TABLE", "CellKind", "CellSpec", "CellUnavailable", "CorpusSpec",
    "CorpusState", "IndexSpec", "ModelSpec", "SwapConfig", "SwapConfigError", "SwapPlan", "TaskSpec", "append_row",
    "build_index", "corpus_relative", "format_swap_table", "index_fingerprint", "index_ready", "load_swap_config",
    "materialize_data", "model_fingerprints", "pair_baselines", "plan_swap", "read_results", "read_swap_file",
    "reader_cell", "retrieval_cell", "run_cell", "run_plan", "run_swap", "stale_reason", "swap_config_from_dict",
    "validate_config", "weights_fingerprint", "write_plots", "write_report",
]
