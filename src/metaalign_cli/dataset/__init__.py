"""The dynamic multi-objective dataset (paper section 3.1, Algorithm 1) for ``build-data``.

Input: rated response pairs (q, y1, y2, R) read from the formats people hold
(:data:`INPUT_FORMATS`): ``ultrafeedback`` (openbmb/UltraFeedback rows), ``scored`` (per-response
scores), ``pairwise`` (chosen/rejected with per-objective labels or ``--objectives``) and
``hh-rlhf`` (Anthropic's raw transcripts). Every reader is a generator: one input row is in
memory at a time, so memory stays flat however large the input.

For each pair, :func:`build_dynamic_dataset` applies Algorithm 1: O> (objectives where y1 is
better), O< (y2 better), O= (tie), each shuffled with a seeded RNG, giving

- a preference item T(q, y2, O>, better) -> y1 when O> is non-empty (preference subset D_p),
- a preference item T(q, y1, O<, better) -> y2 when O< is non-empty (D_p),
- an equal-preference item T(q, y2, O=, equal) -> y1 when O= is non-empty (D_e),
- with probability ``warmup_ratio``, a warm-up copy of that equal item whose target is the
  response in the prompt, y2 (identity mapping, section 3.3 step 1).

No item ever has an empty objective list. An objective whose rating is unknown ("N/A",
missing, non-numeric) for either response is left out of that pair; it is not a tie.

Output directory layout (read by ``metaalign train``)::

    OUT/stats.json
    OUT/{train,validation[,test]}/{warmup,equal,preference}.jsonl
    OUT/{split}/{stage}.sharegpt.json      (only with ``--format sharegpt``, FastChat layout)

Every split directory holds all three stage files (possibly empty). Each JSONL row has these
fields, stable across versions:

- ``id`` (str): ``"<input file stem>:<line>[:<i>-<j>]:<kind>"``, kind one of ``pref-y1``,
  ``pref-y2``, ``equal``, ``warmup``; unique within one build of distinct input files.
- ``stage`` (str): ``warmup`` | ``equal`` | ``preference``; ``split`` (str): ``train`` |
  ``validation`` | ``test``.
- ``query`` (str): q, the query or the dialogue context (``"\\n\\nHuman: ...\\n\\nAssistant:"``).
- ``response`` (str): the response inside the prompt (y0, the one to correct).
- ``objectives`` (list[str]): objective names, in the shuffled order used in the prompt.
- ``target`` (str): the training target.
- ``prompt`` (str): T(q, response, objectives, variant), rendered by
  :meth:`metaalign_cli.templates.CorrectionTemplate.render` (the code ``correct`` uses).
- ``variant`` (str): ``better`` | ``equal``; ``template`` (str): the template name.
- ``source`` (dict): ``file``, ``line`` (1-based line; item number for ``.json`` arrays),
  ``format``, and when the row held several responses ``pair`` ([i, j], 0-based) and
  ``models`` (the responses' ``model`` fields, when present); ``row_id`` when the row had an id.

The split is decided per query (whitespace-normalised text) by a hash salted with
``split_seed``, so no query is in two splits and no query list is held in memory.

The parts, one module each: :mod:`.algorithm` (Algorithm 1 and the warm-up sample),
:mod:`.formats` (one reader per input format), :mod:`.reading` (rows, fields, ratings),
:mod:`.splits` (per-query splits, excluded queries), :mod:`.stats` (``stats.json``),
:mod:`.tokens` (token lengths), :mod:`.writer` (the output files) and :mod:`.build` (the
whole build).
"""

# Names are imported on first use (PEP 562), so importing one part (``from metaalign_cli.dataset.formats
# import split_hh_transcripts``) does not import the others.
_WHERE = {
    **dict.fromkeys(["SPLITS", "STAGES", "DatasetItem", "RatedPair", "Relation", "build_dynamic_dataset", "pair_rng"], "algorithm"),
    **dict.fromkeys(["BuildOptions", "build_data"], "build"),
    **dict.fromkeys(["INPUT_FORMATS", "READERS", "guess_file_format", "guess_format", "read_rated_pairs", "split_hh_transcripts"], "formats"),
    **dict.fromkeys(["UNKNOWN_RATINGS", "ReadOptions", "parse_rating", "relation", "source_rows"], "reading"),
    **dict.fromkeys(["hash_query", "load_excluded_queries", "normalize_query", "split_for_query"], "splits"),
    **dict.fromkeys(["BAD_RECORD_REASONS", "PAIR_DROP_REASONS", "BuildStats"], "stats"),
    **dict.fromkeys(["load_token_counter", "percentiles"], "tokens"),
    **dict.fromkeys(["DatasetWriter", "output_files"], "writer"),
}

__all__ = [
    "BAD_RECORD_REASONS", "BuildOptions", "BuildStats", "DatasetItem", "DatasetWriter", "INPUT_FORMATS",
    "PAIR_DROP_REASONS", "READERS", "RatedPair", "ReadOptions", "Relation", "SPLITS", "STAGES", "UNKNOWN_RATINGS",
    "build_data", "build_dynamic_dataset", "guess_file_format", "guess_format", "hash_query",
    "load_excluded_queries", "load_token_counter", "normalize_query", "output_files", "pair_rng", "parse_rating",
    "percentiles", "read_rated_pairs", "relation", "source_rows", "split_for_query", "split_hh_transcripts",
]


def __getattr__(name: str):
    """The public name ``name`` from the part that defines it (imported on first use)."""
    import importlib

    if name not in _WHERE:
        raise AttributeError(f"module 'metaalign_cli.dataset' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"metaalign_cli.dataset.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
