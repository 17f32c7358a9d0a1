"""A short-answer development set, scored without a judge: does a corrector keep a right short
answer right, and does it fix a wrong one?

The HH development sets (bench/dev_sets.py) hold long dialogue answers, so nothing measured
what new users saw at once: the shipped corrector turning "72" into "9 * 8 = 64" or "gato" into
"Caballo". Here each of 40 plain questions (sums, capitals, one-word translations, facts) comes
twice: once answered right ("72"), once answered wrong ("64"), the way a strong and a weak
policy would. A correction counts as right when it holds the right answer and not the wrong
one it was paired with (word-bounded, case-insensitive; "Not Lyon but Paris" counts as wrong,
so the rule is strict, never generous):

    python bench/short_answers.py make -o out/short          # short-right.jsonl, short-wrong.jsonl
    metaalign correct out/short/short-right.jsonl -o out/short/p/short-right.jsonl
    metaalign correct out/short/short-wrong.jsonl -o out/short/p/short-wrong.jsonl
    python bench/short_answers.py score out/short/p/short-*.jsonl

``score`` prints, per file: records, unchanged, right before and after correcting (with 95%
Wilson intervals), kept right (right -> right), broken (right -> wrong) and fixed (wrong ->
right). The questions are this project's own; every record asks for the objective helpful.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# (question, right-answer patterns (regex, any), right response, wrong response, wrong pattern)
QUESTIONS: list[tuple[str, str, str, str, str]] = [
    ("What is 8 times 9?", r"72", "72", "64", r"64"),
    ("What is 15 plus 27?", r"42", "42", "32", r"32"),
    ("What is 100 divided by 4?", r"25", "25", "40", r"40"),
    ("What is 13 minus 5?", r"8|eight", "8", "7", r"7|seven"),
    ("What is the square root of 81?", r"9|nine", "9", "8", r"8|eight"),
    ("What is 7 plus 6?", r"13|thirteen", "13", "12", r"12|twelve"),
    ("What is 12 times 12?", r"144", "144", "124", r"124"),
    ("What is half of 50?", r"25", "25", "20", r"20"),
    ("What is 2 to the power of 10?", r"1,?024", "1024", "1000", r"1,?000"),
    ("How many days are in a week?", r"7|seven", "Seven.", "Five.", r"5|five"),
    ("How many legs does a spider have?", r"8|eight", "Eight.", "Six.", r"6|six"),
    ("How many minutes are in an hour?", r"60|sixty", "60 minutes.", "100 minutes.", r"100|hundred"),
    ("How many hours are in a day?", r"24|twenty-four", "24 hours.", "12 hours.", r"12|twelve"),
    ("How many sides does a hexagon have?", r"6|six", "Six.", "Eight.", r"8|eight"),
    ("What is the capital of France?", r"paris", "Paris.", "Lyon.", r"lyon"),
    ("What is the capital of Japan?", r"tokyo", "Tokyo.", "Kyoto.", r"kyoto"),
    ("What is the capital of Canada?", r"ottawa", "Ottawa.", "Toronto.", r"toronto"),
    ("What is the capital of Australia?", r"canberra", "Canberra.", "Sydney.", r"sydney"),
    ("What is the capital of Italy?", r"rome|roma", "Rome.", "Milan.", r"milan|milano"),
    ("What is the capital of Egypt?", r"cairo", "Cairo.", "Alexandria.", r"alexandria"),
    ('How do you say "cat" in Spanish?', r"gato", "Gato.", "Perro.", r"perro"),
    ('How do you say "thank you" in French?', r"merci", "Merci.", "Bonjour.", r"bonjour"),
    ('How do you say "dog" in German?', r"hund", "Hund.", "Katze.", r"katze"),
    ('How do you say "water" in Spanish?', r"agua", "Agua.", "Leche.", r"leche"),
    ('How do you say "hello" in Japanese?', r"konnichiwa|konichiwa|こんにちは", "Konnichiwa.", "Sayonara.",
     r"sayonara|さようなら"),
    ('How do you say "book" in German?', r"buch", "Buch.", "Tisch.", r"tisch"),
    ('How do you say "good night" in Spanish?', r"buenas noches", "Buenas noches.", "Buenos días.",
     r"buenos d[ií]as"),
    ("What is the chemical symbol for gold?", r"au", "Au.", "Ag.", r"ag"),
    ("What is the chemical formula of water?", r"h2o|h₂o", "H2O.", "CO2.", r"co2|co₂"),
    ("What planet is closest to the sun?", r"mercury", "Mercury.", "Venus.", r"venus"),
    ("What is the largest planet in the solar system?", r"jupiter", "Jupiter.", "Saturn.", r"saturn"),
    ('Who wrote "Romeo and Juliet"?', r"shakespeare", "William Shakespeare.", "Charles Dickens.", r"dickens"),
    ("At what temperature does water boil at sea level, in degrees Celsius?", r"100",
     "100 degrees Celsius.", "90 degrees Celsius.", r"90"),
    ("What color do you get by mixing blue and yellow?", r"green", "Green.", "Purple.", r"purple"),
    ('What is the opposite of "hot"?', r"cold", "Cold.", "Warm.", r"warm"),
    ('What is the past tense of "go"?', r"went", "Went.", "Goed.", r"goed"),
    ('What is the plural of "mouse"?', r"mice", "Mice.", "Mouses.", r"mouses"),
    ("In which year did World War II end?", r"1945", "1945.", "1939.", r"1939"),
    ("What is the hardest natural substance?", r"diamonds?", "Diamond.", "Gold.", r"gold"),
    ("Which ocean is the largest?", r"pacific", "The Pacific Ocean.", "The Atlantic Ocean.", r"atlantic"),
]


def _has(pattern: str, text: str) -> bool:
    return re.search(rf"(?<!\w)(?:{pattern})(?!\w)", text, re.I) is not None


def is_right(text: str, right: str, wrong: str) -> bool:
    """Whether ``text`` holds the right answer (``right``, a regex) and not the wrong one it was
    paired with (``wrong``), each as a whole word, case-insensitive."""
    return _has(right, text) and not _has(wrong, text)


def records(kind: str) -> list[dict]:
    """The 40 records of ``kind`` ("right" or "wrong"): id, query, response (the right or the
    wrong short answer), objectives ["helpful"], and the two patterns ``score`` checks."""
    out = []
    for i, (q, right, good, bad, wrong) in enumerate(QUESTIONS):
        out.append({"id": f"short-{kind}-{i:02d}", "query": q, "response": good if kind == "right" else bad,
                    "objectives": ["helpful"], "answer": right, "wrong": wrong})
    return out


def score(rows: list[dict], field: str = "corrected") -> dict:
    """Counts of one corrected file: n, unchanged, right_before, right_after, kept (right ->
    right), broken (right -> wrong), fixed (wrong -> right); rows without ``field`` (failed
    records) count as not right after."""
    c = dict(n=len(rows), unchanged=0, right_before=0, right_after=0, kept=0, broken=0, fixed=0)
    for r in rows:
        before = is_right(r["response"], r["answer"], r["wrong"])
        out = r.get(field)
        after = isinstance(out, str) and is_right(out, r["answer"], r["wrong"])
        c["unchanged"] += out == r["response"]
        c["right_before"] += before
        c["right_after"] += after
        c["kept"] += before and after
        c["broken"] += before and not after
        c["fixed"] += (not before) and after
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write short-right.jsonl and short-wrong.jsonl")
    mk.add_argument("-o", "--out", required=True)
    sc = sub.add_parser("score", help="count right answers before and after correcting")
    sc.add_argument("files", nargs="+")
    sc.add_argument("--field", default="corrected")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        d = Path(a.out)
        d.mkdir(parents=True, exist_ok=True)
        for kind in ("right", "wrong"):
            with open(d / f"short-{kind}.jsonl", "w", encoding="utf-8") as f:
                for r in records(kind):
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {d}/short-right.jsonl and {d}/short-wrong.jsonl ({len(QUESTIONS)} records each)", file=sys.stderr)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from metaalign_cli.judging.stats import wilson_interval

    print(f"{'file':44} {'n':>3} {'unchanged':>9} {'right before':>13} {'right after [95% CI]':>24} "
          f"{'kept':>5} {'broken':>6} {'fixed':>5}")
    for f in a.files:
        rows = [json.loads(x) for x in open(f, encoding="utf-8") if x.strip()]
        c = score(rows, a.field)
        lo, hi = wilson_interval(c["right_after"], c["n"]) or (0.0, 0.0)
        print(f"{f:44} {c['n']:>3} {c['unchanged']:>9} {c['right_before']:>13} "
              f"{c['right_after']:>6} [{lo * 100:4.0f}%, {hi * 100:4.0f}%]    {c['kept']:>5} {c['broken']:>6} {c['fixed']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
