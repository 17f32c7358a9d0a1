"""A weak policy's answers to HH-RLHF-style queries: the inputs a corrector is judged (and trained) on.

The policy is SmolLM2-135M-Instruct (the embedded GGUF as shipped, Q4_1), answering greedily
(no repeat penalty) through its chat template, the "\\n\\nHuman: ...\\n\\nAssistant: ..." turns
of the query given as chat messages. Queries come from a CSV (the reference samples'
``query, goldens, generated_text`` columns) or a JSONL file with a ``query`` field; a seeded
sample of a row range is answered, in row order, one output line per row, written as soon as it
is done (``--resume`` skips the ids already in the output).

Output JSONL: ``id`` (``<prefix><row>``, row = 0-based data row of the input), ``query``,
``response`` (the weak answer), ``golden`` (the ``--golden-field`` value, when the input has
it), ``objectives``, plus ``finish_reason`` ("stop" or "length") -- ready for
``metaalign correct`` and then ``metaalign judge``.

    # the development set of docs/train.md (50 of rows 0-599 of Claude-3.csv, seed 0, 256 tokens)
    python bench/weak_policy.py ../shared/data/metaaligner-samples/hh-rlhf/Claude-3.csv \\
        --rows 0:600 -n 50 --seed 0 --max-tokens 256 --id-prefix hh-dev- -o dev/weak-hh.jsonl
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from pathlib import Path


def to_messages(query: str) -> list[dict]:
    """HH-RLHF "\\n\\nHuman: ...\\n\\nAssistant: ..." context (ending in "Assistant:") as chat turns
    (list of {"role": "user"|"assistant", "content": str}); a query without any "Human:" marker is
    one user turn."""
    body = "\n\n" + query.strip().removesuffix("Assistant:").strip()
    parts = re.split(r"\n\n(Human|Assistant): ", body)
    msgs = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(parts[1::2], parts[2::2])]
    return msgs or [{"role": "user", "content": query.strip()}]


def read_rows(path: str) -> list[dict]:
    """Rows of a CSV (csv.DictReader) or JSONL file, as dicts, in file order."""
    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick_rows(n_rows: int, lo: int, hi: int, n: int | None, seed: int, exclude: str | None = None) -> list[int]:
    """0-based row indices: a ``random.Random(seed)`` sample of ``n`` from [lo, min(hi, n_rows)),
    sorted (all of them when ``n`` is None or larger than the range).

    ``exclude="N:SEED"`` first leaves out the rows that ``pick_rows(n_rows, lo, hi, N, SEED)``
    picks, so a second development set of the same range shares no row with the first
    (``--exclude 50:0`` beside the judged 50 of seed 0)."""
    pool = list(range(lo, min(hi, n_rows)))
    if exclude:
        ex_n, _, ex_seed = exclude.partition(":")
        taken = set(pick_rows(n_rows, lo, hi, int(ex_n), int(ex_seed or 0)))
        pool = [i for i in pool if i not in taken]
    if n is not None and n < len(pool):
        pool = random.Random(seed).sample(pool, n)
    return sorted(pool)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="CSV with a query column, or JSONL with a query field")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--rows", default="0:", help="row range LO:HI (0-based, HI exclusive; default all)")
    ap.add_argument("-n", "--sample", type=int, help="answer a seeded sample of this many rows of the range")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", metavar="N:SEED", help="leave out the rows of the seeded N-sample of the same range")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--id-prefix", default="row-")
    ap.add_argument("--query-field", default="query")
    ap.add_argument("--golden-field", default="goldens", help="copied to 'golden' when present")
    ap.add_argument("--objectives", default="harmless,helpful")
    ap.add_argument("--keep-fields", default="", help="comma-separated input fields copied as they are")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="decode this many rows together (metaalign's batched greedy llama.cpp decoding; "
                         "1 = llama-cpp-python's create_chat_completion, one row at a time)")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)

    from metaalign_cli.backends import default_model_path

    lo_s, _, hi_s = a.rows.partition(":")
    rows = read_rows(a.input)
    idx = pick_rows(len(rows), int(lo_s or 0), int(hi_s) if hi_s else len(rows), a.sample, a.seed, a.exclude)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if a.resume and out.exists():
        done = {json.loads(l)["id"] for l in out.read_text(encoding="utf-8").splitlines() if l.strip()}
    objectives = [o.strip() for o in a.objectives.split(",") if o.strip()]
    keep = [k.strip() for k in a.keep_fields.split(",") if k.strip()]
    todo = [i for i in idx if f"{a.id_prefix}{i}" not in done]
    answer = batch_answerer(a) if a.batch_size > 1 else single_answerer(a)
    with open(out, "a" if a.resume else "w", encoding="utf-8") as f:
        for k in range(0, len(todo), a.batch_size):
            chunk = todo[k:k + a.batch_size]
            for i, (text, finish, n_tok) in zip(chunk, answer([to_messages(rows[i][a.query_field]) for i in chunk])):
                r = rows[i]
                rec = {"id": f"{a.id_prefix}{i}", "query": r[a.query_field], "response": text.strip()}
                if a.golden_field in r:
                    rec["golden"] = r[a.golden_field]
                rec["objectives"] = objectives
                rec["finish_reason"] = finish
                for key in keep:
                    rec[key] = r.get(key)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                print(f"{rec['id']} {finish} {n_tok} tokens", file=sys.stderr, flush=True)


def single_answerer(a):
    """messages -> (text, finish_reason, tokens), one chat completion at a time (llama-cpp-python)."""
    from llama_cpp import Llama

    from metaalign_cli.backends import default_model_path
    from metaalign_cli.backends.llamacpp import avoid_amx_weights

    avoid_amx_weights()  # ggml's AMX matmul segfaults on AMX CPUs
    llm = Llama(model_path=str(a.model or default_model_path()), n_ctx=2048, n_threads=a.threads, verbose=False)

    def answer(batch):
        out = []
        for msgs in batch:
            res = llm.create_chat_completion(msgs, max_tokens=a.max_tokens, temperature=0.0, repeat_penalty=1.0)
            ch = res["choices"][0]
            out.append((ch["message"]["content"], ch.get("finish_reason"), res["usage"]["completion_tokens"]))
        return out

    return answer


def batch_answerer(a):
    """The same answers, greedy, decoded a batch at a time by metaalign's llama.cpp backend (the GGUF as
    it is, no re-quantization, no loop guard): the chat template is applied to the whole message list."""
    from metaalign_cli.backends.base import GenerationSettings
    from metaalign_cli.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(a.model, n_ctx=2048 * a.batch_size, threads=a.threads)
    settings = GenerationSettings(max_new_tokens=a.max_tokens, loop_guard=False)

    def answer(batch):
        items = []
        for msgs in batch:
            res = be._formatter(messages=msgs)
            toks = be.llm.tokenize(res.prompt.encode("utf-8"), add_bos=True, special=True)
            if len(toks) > 1 and toks[0] == toks[1] == be.llm.token_bos():
                toks = toks[1:]
            stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
            items.append((toks, stop))
        return [(g.text, g.finish_reason, g.completion_tokens) for g in be._generate_batched(items, settings)]

    return answer


if __name__ == "__main__":
    main()
