"""The corrector development sets that need no generation (docs/train.md, "Development sets").

strong-hh: the same seeded rows as bench/weak_policy.py picks (same --rows, -n, --seed), with
the CSV's own policy answer (``generated_text``, Claude-3's in Claude-3.csv) as ``response``.

multi-aspect: the validation split of the multi-aspect set, chosen exactly as
``metaalign build-data --validation-ratio R --split-seed S`` chooses it (per instruction, by
:func:`metaalign_cli.dataset.split_for_query`), so a training build with the same two flags
never holds one of these instructions. Per instruction: ``golden`` = the response with the
best mean of its 4 ratings, ``response`` = the one with the worst mean (first in file order
on ties; never the golden). ``query`` is the instruction as a one-turn HH-RLHF dialogue
("\\n\\nHuman: <instruction>\\n\\nAssistant:"), the form the hh-rlhf template's ``Context:``
holds; ``instruction`` keeps the raw text. Also writes ``multi-aspect-instructions.jsonl``
(``{"query": <raw instruction>}`` per line) for ``build-data --exclude-queries``.

    python bench/dev_sets.py --out ../eval/dev
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from weak_policy import pick_rows, read_rows  # noqa: E402

# ../shared/data beside the checkout (the main checkout) or beside its parent (a git worktree).
DATA = next((d / "shared" / "data" for d in Path(__file__).resolve().parents[2:4] if (d / "shared" / "data").is_dir()),
            Path("../shared/data"))
ASPECTS = {"instruction_following": "instruction_following", "honesty": "honest",
           "truthfulness": "truthful", "helpfulness": "helpful"}


def hh_dialogue(instruction: str) -> str:
    """A single instruction as a one-turn HH-RLHF context ending in "Assistant:"."""
    from metaalign_cli.templates import dialogue_to_text

    return dialogue_to_text([("user", instruction.strip())])


def mean_rating(completion: dict) -> float:
    """Mean of the 4 UltraFeedback-style ratings of one completion (1-5)."""
    return statistics.mean(float(completion["annotations"][a]["Rating"]) for a in ASPECTS)


def strong_hh(csv_path: Path, rows: str, n: int, seed: int, prefix: str, exclude: str | None = None) -> list[dict]:
    data = read_rows(str(csv_path))
    lo, _, hi = rows.partition(":")
    return [{"id": f"{prefix}{i}", "query": data[i]["query"], "response": data[i]["generated_text"],
             "golden": data[i]["goldens"], "objectives": ["harmless", "helpful"]}
            for i in pick_rows(len(data), int(lo or 0), int(hi) if hi else len(data), n, seed, exclude)]


def multi_aspect(path: Path, ratio: float, split_seed: int) -> list[dict]:
    from metaalign_cli.dataset import split_for_query

    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        r = json.loads(line)
        if split_for_query(r["instruction"], ratio, 0.0, split_seed) != "validation":
            continue
        comps = r["completions"]
        means = [mean_rating(c) for c in comps]
        best = means.index(max(means))
        rest = [i for i in range(len(comps)) if i != best]
        worst = min(rest, key=lambda i: (means[i], i))
        out.append({"id": f"ma-dev-{line_no}", "query": hh_dialogue(r["instruction"]),
                    "instruction": r["instruction"], "response": comps[worst]["response"],
                    "golden": comps[best]["response"],
                    "objectives": ["instruction_following", "honest", "truthful", "helpful"],
                    "response_model": comps[worst]["model"], "golden_model": comps[best]["model"],
                    "response_mean_rating": means[worst], "golden_mean_rating": means[best],
                    "row_id": r.get("id")})
    return out


def write(path: Path, recs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"{path}: {len(recs)} records", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--csv", default=str(DATA / "metaaligner-samples" / "hh-rlhf" / "Claude-3.csv"))
    ap.add_argument("--rows", default="0:600")
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", metavar="N:SEED", help="leave out the rows of the seeded N-sample of the range "
                    "(as bench/weak_policy.py --exclude)")
    ap.add_argument("--multi-aspect", default=str(DATA / "multi-aspect" / "just-eval-ultrafeedback-160.jsonl"))
    ap.add_argument("--validation-ratio", type=float, default=0.25)
    ap.add_argument("--split-seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "strong-hh.jsonl", strong_hh(Path(a.csv), a.rows, a.n, a.seed, "hh-dev-", a.exclude))
    ma = multi_aspect(Path(a.multi_aspect), a.validation_ratio, a.split_seed)
    write(out / "multi-aspect.jsonl", ma)
    write(out / "multi-aspect-instructions.jsonl", [{"query": r["instruction"]} for r in ma])


if __name__ == "__main__":
    main()
