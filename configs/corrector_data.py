"""Training data for the shipped corrector (configs/corrector*.yaml; docs/corrector.md).

Two steps, both deterministic (seeded), reading only ../shared/data and files made here:

1. ``pools``: the training query pools, with every paper test query kept out
   (``metaaligner-samples/hh-rlhf/*.csv``: the whole dialogue, and also any dialogue whose first
   human turn is a test dialogue's first turn) and every multi-aspect development instruction kept
   out (``--exclude-instructions``, from bench/dev_sets.py):

   - ``hh.jsonl``: HH-RLHF harmless-base dialogues (``query`` = the context ending in
     "Assistant:", ``chosen``, ``rejected``: the two final turns);
   - ``redteam.jsonl``: just-eval's 200 red-team prompts (ids 800-999) as one-turn dialogues, with
     the 7 models' answers and their 1-5 safety scores (``answers``), and ``target``: the answer
     :func:`pick_safe_target` picks;
   - ``general.jsonl``: just-eval's general instructions (ids 0-799) as one-turn dialogues with
     gpt-4-0613's answer (``target``) and gpt-3.5-turbo-0301's (``alt``).

   The weak policy then answers a seeded sample of each pool (bench/weak_policy.py, the same
   settings as the development set: greedy, 256 new tokens).

2. ``build``: the stage files ``metaalign train`` reads (``OUT/train/<stage>.jsonl``, the
   ``build-data`` row layout plus ``kind``), every prompt rendered by the library's
   :meth:`CorrectionTemplate.render` with the ``better`` variant, the one ``correct`` sends:

   - ``fix``: T(q, weak answer, O) -> a good answer (HH chosen turn, the red-team safe target, gpt-4's
     answer): the corrector sees the weak answers it will meet;
   - ``fix`` from ``samples``: the weak policy's answers to rows 600-999 of the paper's HH-RLHF
     test CSVs (``metaaligner-samples/hh-rlhf``; neither the development rows 0-599 nor the final
     test rows 1000+, and no dialogue whose first human turn is one of theirs) -> the strong
     policies' answer to the same query (:func:`pick_sample_target`);
   - ``keep``: T(q, good answer, O) -> the same answer (identity with the ``better`` prompt: "improve
     this" on an answer that is already good means keep it);
   - ``pref``: Algorithm 1 preference items (:func:`metaalign_cli.dataset.build_dynamic_dataset`)
     from HH-RLHF (rejected -> chosen on harmless) and from the multi-aspect set's train
     instructions (as one-turn dialogues, the form the development set uses).

   Each kind is sampled to the size asked (``--fix-hh N`` ...), with ``--max-refusal-share``
   capping the share of ``fix``/``pref`` targets that open with a refusal and
   ``--max-keep-refusal-share`` that of each ``keep`` part (Claude-3's answers of at most
   ``--max-target-words`` words are nearly all refusals; ``--keep-samples-models claude,gpt35``
   adds gpt-3.5-turbo's, mostly short non-refusals). All kinds go to one
   stage file (``--stage``, default preference), shuffled, so the last stage sees the mixture.

    python configs/corrector_data.py pools -o ../runs/data/pools --exclude-instructions ../eval/dev/multi-aspect-instructions.jsonl
    python bench/weak_policy.py ../runs/data/pools/hh.jsonl -n 240 --seed 1 --id-prefix hh- \\
        --keep-fields chosen,rejected -o ../runs/data/weak/hh.jsonl --batch-size 8
    ...
    python configs/corrector_data.py build --pools ../runs/data/pools --weak ../runs/data/weak -o ../runs/data/mix-a ...
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

DATA = next((d / "shared" / "data" for d in Path(__file__).resolve().parents[2:4] if (d / "shared" / "data").is_dir()),
            Path("../shared/data"))
HH_OBJECTIVES = ["harmless", "helpful"]
MA_OBJECTIVES = ["instruction_following", "honest", "truthful", "helpful"]
MA_ASPECTS = {"instruction_following": "instruction_following", "honesty": "honest",
              "truthfulness": "truthful", "helpfulness": "helpful"}
# The opening of a refusal (same list as bench/corrector_report.py, plus the "I apologize" openings).
REFUSAL = re.compile(r"^\s*(i apologi[sz]e|i'?m sorry|i am sorry|sorry|i cannot|i can'?t|i can ?not|i won'?t|"
                     r"i will not|i'?m not able|i am not able|i'?m unable|i am unable|as an ai|"
                     r"i do not feel comfortable|i don'?t feel comfortable|it is not appropriate|"
                     r"it'?s not appropriate|i must decline|i'?m just an ai)", re.I)


SAMPLE_MODELS = {"claude": "Claude-3", "gpt35": "gpt-3.5-turbo"}


def is_refusal(text: str) -> bool:
    """True when ``text`` opens like a refusal (see :data:`REFUSAL`)."""
    return bool(REFUSAL.match(text.replace("\u2019", "'")))


def norm(text: str) -> str:
    """Whitespace-collapsed text (the key ``build-data --exclude-queries`` matches on)."""
    return " ".join(text.split())


def hh_dialogue(instruction: str) -> str:
    """A single instruction as a one-turn HH-RLHF context ending in "Assistant:"."""
    from metaalign_cli.templates import dialogue_to_text

    return dialogue_to_text([("user", instruction.strip())])


def first_turn(query: str) -> str:
    """The first human turn of an HH-RLHF context (normalised), or the whole text."""
    m = re.match(r"\s*Human:(.*?)(?:\n\nAssistant:|$)", query, re.S)
    return norm(m.group(1) if m else query)


def test_queries() -> tuple[set[str], set[str]]:
    """(normalised paper test dialogues, their normalised first human turns) of both HH-RLHF CSVs."""
    full, first = set(), set()
    for f in sorted(glob.glob(str(DATA / "metaaligner-samples" / "hh-rlhf" / "*.csv"))):
        with open(f, encoding="utf-8", newline="") as fh:
            for r in csv.DictReader(fh):
                full.add(norm(r["query"]))
                first.add(first_turn(r["query"]))
    return full, first


def usable_chosen(text: str, min_words: int) -> bool:
    """An HH-RLHF chosen turn good enough as a target or a kept answer: at least ``min_words``
    words, and not a short question back ("What do you mean?": a quarter of the chosen turns)."""
    words = len(text.split())
    return words >= min_words and not (text.strip().endswith("?") and words < 25)


def pick_safe_target(answers: dict[str, dict], rng: random.Random) -> tuple[str, str] | None:
    """The target for a red-team prompt: among answers with safety score 5 and 20-220 words,
    one that does not open with a refusal if there is one (a safe answer that explains and
    redirects), else a refusal from gpt-3.5-turbo, Llama-2-chat or gpt-4 that says why (>= 20
    words); seeded choice among the candidates. Returns (model, text) or None."""
    ok = {m: a["text"] for m, a in answers.items() if str(a.get("score")) == "5" and 20 <= len(a["text"].split()) <= 220}
    plain = sorted(m for m, t in ok.items() if not is_refusal(t))
    if plain:
        m = rng.choice(plain)
        return m, ok[m]
    for m in ("gpt-3.5-turbo-0301", "Llama-2-7b-chat-hf", "gpt-4-0613", "Yi-6B-Chat", "tulu-2-dpo-7b"):
        if m in ok:
            return m, ok[m]
    return None


def pick_sample_target(claude: str, gpt35: str, max_words: int) -> tuple[str, str] | None:
    """The fix target for a ``samples`` row (rows 600-999 of the HH-RLHF sample CSVs): Claude-3's
    answer when it does not open with a refusal, else gpt-3.5-turbo's when it does not, else
    Claude-3's refusal (which says why); answers over ``max_words`` words or under 8 are skipped.
    Returns (model, text) or None."""
    ok = [(m, t.strip()) for m, t in (("Claude-3", claude), ("gpt-3.5-turbo", gpt35))
          if t and 8 <= len(t.split()) <= max_words]
    for m, t in ok:
        if not is_refusal(t):
            return m, t
    return next(((m, t) for m, t in ok if m == "Claude-3"), None)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Openings the refusal pattern matches that are not a refusal: sympathy, a self-correction.
NOT_A_REFUSAL = re.compile(r"^\s*(i'?m sorry to hear|i am sorry to hear|i'?m so sorry|i apologi[sz]e,? (for|my|if))", re.I)


def decline_target(text: str, min_words: int = 20) -> str | None:
    """A refusal that says why, without its refusal sentences: Claude-3's "I apologize, but I
    cannot help you rob a store. That would be unethical and against the law. I suggest ..."
    becomes "That would be unethical and against the law. I suggest ...", a decline that explains
    and redirects, as the HH-RLHF goldens do. None when ``text`` does not open with a refusal,
    opens with sympathy or a self-correction, or keeps fewer than ``min_words`` words."""
    text = text.strip().replace("\u2019", "'")
    if not is_refusal(text) or NOT_A_REFUSAL.match(text):
        return None
    while text and is_refusal(text):
        parts = SENTENCE_END.split(text, 1)
        text = parts[1].strip() if len(parts) > 1 else ""
    return text if len(text.split()) >= min_words else None


def tic_openings(weak_answers: list[str], min_words: int = 6) -> list[str]:
    """The weak policy's refusal-like first sentences ("I'm sorry for any misunderstanding, but as
    a chatbot designed to assist, I don't have the ability to ..."), deduplicated in first-seen
    order: the first sentence of every answer in ``weak_answers`` that opens with a refusal
    (:func:`is_refusal`) and has at least ``min_words`` words."""
    seen: dict[str, None] = {}
    for text in weak_answers:
        text = text.strip().replace("\u2019", "'")
        first = SENTENCE_END.split(text, 1)[0].strip()
        if is_refusal(first) and len(first.split()) >= min_words:
            seen.setdefault(first, None)
    return list(seen)


def sample_rows(weak_file: Path) -> list[dict]:
    """The weak policy's answers to rows 600-999 of Claude-3.csv (bench/weak_policy.py output, ids
    ``mid-<row>``), each with ``claude`` and ``gpt35``: the two sample CSVs' answers to that row.
    Rows whose dialogue or first human turn is a development (0-599) or final-test (1000+) row's
    are dropped."""
    files = {m: DATA / "metaaligner-samples" / "hh-rlhf" / f for m, f in (("claude", "Claude-3.csv"), ("gpt35", "gpt-3.5-turbo.csv"))}
    csv.field_size_limit(1 << 30)
    data = {m: list(csv.DictReader(open(f, encoding="utf-8", newline=""))) for m, f in files.items()}
    held = data["claude"][:600] + data["claude"][1000:]
    full, first = {norm(r["query"]) for r in held}, {first_turn(r["query"]) for r in held}
    out = []
    for r in read_jsonl(weak_file):
        row = int(r["id"].rsplit("-", 1)[1])
        if not 600 <= row < 1000 or norm(r["query"]) in full or first_turn(r["query"]) in first:
            continue
        assert data["claude"][row]["query"] == r["query"], r["id"]
        out.append({**r, "row": row, "claude": data["claude"][row]["generated_text"],
                    "gpt35": data["gpt35"][row]["generated_text"]})
    return out


def cmd_pools(a) -> None:
    from metaalign_cli.dataset import split_hh_transcripts

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    full, first = test_queries()
    dev = set()
    for f in a.exclude_instructions or ():
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            if line.strip():
                dev.add(norm(json.loads(line)["query"]))
    counts = Counter()
    with open(out / "hh.jsonl", "w", encoding="utf-8") as fo, gzip.open(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt",
                                                                        encoding="utf-8") as fi:
        for line_no, line in enumerate(fi, start=1):
            d = json.loads(line)
            parts = split_hh_transcripts(d["chosen"], d["rejected"])
            if parts is None or not parts[1] or not parts[2] or parts[1] == parts[2]:
                counts["hh_unusable"] += 1
                continue
            q, ch, rj = parts
            if norm(q) in full or first_turn(q) in first:
                counts["hh_test_excluded"] += 1
                continue
            fo.write(json.dumps({"query": q, "chosen": ch, "rejected": rj, "line": line_no}, ensure_ascii=False) + "\n")
            counts["hh"] += 1
    answers: dict[int, dict] = {}
    for f in sorted(glob.glob(str(DATA / "just-eval" / "scores" / "safety" / "*.json"))):
        model = Path(f).name.split(".score_safety")[0]
        for r in json.load(open(f, encoding="utf-8")):
            score = ((r.get("parsed_result") or {}).get("safety") or {}).get("score")
            e = answers.setdefault(r["id"], {"instruction": r["input"], "answers": {}})
            e["answers"][model] = {"text": r["output_cand"], "score": score}
    rng = random.Random(a.seed)
    with open(out / "redteam.jsonl", "w", encoding="utf-8") as fo:
        for rid in sorted(answers, key=lambda x: int(x) if str(x).isdigit() else str(x)):
            e = answers[rid]
            ins = e["instruction"]
            if norm(ins) in first or norm(ins) in dev:
                counts["redteam_test_excluded"] += 1
                continue
            pick = pick_safe_target(e["answers"], rng)
            if pick is None:
                counts["redteam_no_target"] += 1
                continue
            fo.write(json.dumps({"query": hh_dialogue(ins), "instruction": ins, "target": pick[1], "target_model": pick[0],
                                 "answers": e["answers"], "id": rid}, ensure_ascii=False) + "\n")
            counts["redteam"] += 1
    je = {m: json.load(open(DATA / "just-eval" / "outputs" / f"{m}.to_eval.json", encoding="utf-8"))
          for m in ("gpt-4-0613", "gpt-3.5-turbo-0301")}
    alt = {x["id"]: x["output"] for x in je["gpt-3.5-turbo-0301"]}
    with open(out / "general.jsonl", "w", encoding="utf-8") as fo:
        for x in je["gpt-4-0613"]:
            if x["category"] == "safety":
                continue
            ins = x["instruction"]
            if norm(ins) in dev or norm(ins) in first or norm(hh_dialogue(ins)) in full:
                counts["general_dev_or_test_excluded"] += 1
                continue
            fo.write(json.dumps({"query": hh_dialogue(ins), "instruction": ins, "target": x["output"],
                                 "alt": alt.get(x["id"]), "id": x["id"], "dataset": x["dataset"]},
                                ensure_ascii=False) + "\n")
            counts["general"] += 1
    print(json.dumps(dict(counts)), file=sys.stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


class Renderer:
    """Rows in the ``build-data`` layout, prompts rendered as ``correct`` renders them."""

    def __init__(self, template: str, seed: int):
        from metaalign_cli.objectives import load_objectives, render_objectives
        from metaalign_cli.templates import load_template

        self.tpl = load_template(template, kind="correction")
        self.objset = load_objectives(include_user=False)
        self.render_objectives = render_objectives
        self.rng = random.Random(seed)

    def row(self, rid: str, kind: str, query: str, response: str, target: str, objectives: list[str],
            source: dict, shuffle: bool = True) -> dict:
        names = list(objectives)
        if shuffle:
            self.rng.shuffle(names)
        aspects = self.render_objectives([self.objset.get(n) for n in names], self.tpl.name)
        return {"id": rid, "stage": "preference", "split": "train", "query": query, "response": response,
                "objectives": names, "target": target, "prompt": self.tpl.render(query, response, aspects, "better"),
                "variant": "better", "template": self.tpl.name, "source": source, "kind": kind}


def pref_rows(ren: Renderer, pools: Path, exclude: set[str], seed: int) -> tuple[list[dict], list[dict]]:
    """Algorithm 1 preference items: (HH rejected -> chosen on harmless, multi-aspect train
    instructions as one-turn dialogues with the objectives where the target is better)."""
    from metaalign_cli.dataset import RatedPair, build_dynamic_dataset, relation

    hh_pairs = [RatedPair(r["query"], r["chosen"], r["rejected"], (("harmless", ">"),), f"hh:{r['line']}",
                          {"file": "harmless-base-test.jsonl.gz", "line": r["line"]})
                for r in read_jsonl(pools / "hh.jsonl")]
    ma_pairs = []
    ma_file = DATA / "multi-aspect" / "just-eval-ultrafeedback-160.jsonl"
    for line_no, line in enumerate(ma_file.read_text(encoding="utf-8").splitlines(), start=1):
        r = json.loads(line)
        if norm(r["instruction"]) in exclude:
            continue
        comps = r["completions"]
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                a, b = comps[i], comps[j]
                if a["response"].strip() == b["response"].strip():
                    continue
                rel = tuple((MA_ASPECTS[k], relation(float(a["annotations"][k]["Rating"]), float(b["annotations"][k]["Rating"])))
                            for k in MA_ASPECTS)
                ma_pairs.append(RatedPair(hh_dialogue(r["instruction"]), a["response"], b["response"], rel,
                                          f"ma:{line_no}:{i}-{j}", {"file": ma_file.name, "line": line_no, "pair": [i, j],
                                                                    "models": [a["model"], b["model"]]}))
    out = []
    for pairs in (hh_pairs, ma_pairs):
        rows = []
        for it in build_dynamic_dataset(pairs, ren.objset, ren.tpl, seed=seed, warmup_ratio=0.0):
            if it.stage != "preference":
                continue
            row = it.to_row("train")
            row["kind"] = "pref"
            rows.append(row)
        out.append(rows)
    return out[0], out[1]


def sample(rows: list[dict], n: int, rng: random.Random, max_refusal_share: float | None = None,
           cap_only: bool = False) -> list[dict]:
    """A seeded sample of ``n`` rows; with ``max_refusal_share``, that share of the sample (or all
    the refusals there are, if fewer) has a target that opens with a refusal, the rest drawn from
    the others. ``cap_only``: never more refusals than a plain draw of ``n`` would hold."""
    rows = list(rows)
    rng.shuffle(rows)
    if max_refusal_share is None:
        return rows[:n]
    ref = [r for r in rows if is_refusal(r["target"])]
    other = [r for r in rows if not is_refusal(r["target"])]
    k = min(len(ref), int(max_refusal_share * n))
    if cap_only:
        k = min(k, sum(is_refusal(r["target"]) for r in rows[:n]))
    picked = other[: n - k] + ref[:k]
    rng.shuffle(picked)
    return picked


def cmd_build(a) -> None:
    pools, weak = Path(a.pools), Path(a.weak)
    ren = Renderer(a.template, a.seed)
    # its own draws, so a mix without declines rebuilds as before
    ren_declines = Renderer(a.template, a.seed + 1) if a.fix_declines else None
    ren_tics = Renderer(a.template, a.seed + 2) if a.fix_tics else None
    rng = random.Random(a.seed)
    exclude = set()
    for f in a.exclude_instructions or ():
        exclude |= {norm(r["query"]) for r in read_jsonl(Path(f))}
    max_words = a.max_target_words
    fix: dict[str, list[dict]] = {"hh": [], "redteam": [], "general": [], "samples": [], "declines": []}
    keep: dict[str, list[dict]] = {"hh": [], "redteam": [], "general": [], "ma": [], "samples": []}
    # fix: the weak policy's answer -> a good one
    for name, target_key in (("hh", "chosen"), ("redteam", "target"), ("general", "target")):
        f = weak / f"{name}.jsonl"
        if not f.exists():
            continue
        for r in read_jsonl(f):
            tgt = r.get(target_key)
            if not tgt or len(tgt.split()) > max_words or not r["response"].strip():
                continue
            if name == "hh" and not usable_chosen(tgt, a.min_chosen_words):
                continue
            objs = HH_OBJECTIVES if name != "general" else rng.sample(MA_OBJECTIVES, rng.randint(1, 4))
            fix[name].append(ren.row(f"fix:{r['id']}", "fix", r["query"], r["response"], tgt, objs,
                                     {"pool": name, "id": r["id"], "weak_finish": r.get("finish_reason")}))
    if (weak / "samples.jsonl").exists():
        for r in sample_rows(weak / "samples.jsonl"):
            pick = pick_sample_target(r["claude"], r["gpt35"], max_words)
            if pick and r["response"].strip():
                fix["samples"].append(ren.row(f"fix:{r['id']}", "fix", r["query"], r["response"], pick[1], HH_OBJECTIVES,
                                              {"pool": "samples", "row": r["row"], "target_model": pick[0],
                                               "weak_finish": r.get("finish_reason")}))
            decline = decline_target(r["claude"]) if a.fix_declines and pick and is_refusal(pick[1]) else None
            if decline and len(decline.split()) <= max_words and r["response"].strip():
                fix["declines"].append(ren_declines.row(f"fix:{r['id']}:decline", "fix", r["query"], r["response"], decline,
                                               HH_OBJECTIVES, {"pool": "declines", "row": r["row"],
                                                               "target_model": "Claude-3, refusal sentences cut",
                                                               "weak_finish": r.get("finish_reason")}))
            for model in a.keep_samples_models.split(","):
                c = r[model].strip()
                if 8 <= len(c.split()) <= max_words:
                    rid = f"keep:{r['id']}" if model == "claude" else f"keep:{r['id']}:{model}"
                    keep["samples"].append(ren.row(rid, "keep", r["query"], c, c, HH_OBJECTIVES,
                                                   {"pool": "samples", "row": r["row"], "model": SAMPLE_MODELS[model]}))
    # keep: an answer that is already good -> itself
    for r in read_jsonl(pools / "redteam.jsonl"):
        for m, ans in sorted(r["answers"].items()):
            if str(ans.get("score")) == "5" and 25 <= len(ans["text"].split()) <= max_words and \
                    m in ("gpt-3.5-turbo-0301", "Llama-2-7b-chat-hf", "gpt-4-0613", "Mistral-7B-Instruct-v0.1"):
                keep["redteam"].append(ren.row(f"keep:redteam-{r['id']}:{m}", "keep", r["query"], ans["text"], ans["text"],
                                               HH_OBJECTIVES, {"pool": "redteam", "id": r["id"], "model": m}))
    for r in read_jsonl(pools / "general.jsonl"):
        for key in ("target", "alt"):
            t = r.get(key)
            if t and 10 <= len(t.split()) <= max_words:
                objs = rng.sample(MA_OBJECTIVES + HH_OBJECTIVES[:1], rng.randint(1, 4))
                objs = list(dict.fromkeys(o for o in objs))
                keep["general"].append(ren.row(f"keep:general-{r['id']}:{key}", "keep", r["query"], t, t, objs,
                                               {"pool": "general", "id": r["id"], "answer": key}))
    for r in read_jsonl(pools / "hh.jsonl"):
        if usable_chosen(r["chosen"], a.min_chosen_words) and len(r["chosen"].split()) <= max_words:
            keep["hh"].append(ren.row(f"keep:hh-{r['line']}", "keep", r["query"], r["chosen"], r["chosen"], HH_OBJECTIVES,
                                      {"pool": "hh", "line": r["line"]}))
    ma_file = DATA / "multi-aspect" / "just-eval-ultrafeedback-160.jsonl"
    for line_no, line in enumerate(ma_file.read_text(encoding="utf-8").splitlines(), start=1):
        r = json.loads(line)
        if norm(r["instruction"]) in exclude:
            continue
        for c in r["completions"]:
            if all(c["annotations"][k]["Rating"] in ("5",) for k in MA_ASPECTS) and len(c["response"].split()) <= max_words:
                keep["ma"].append(ren.row(f"keep:ma-{line_no}:{c['model']}", "keep", hh_dialogue(r["instruction"]),
                                          c["response"], c["response"], rng.sample(MA_OBJECTIVES, rng.randint(1, 4)),
                                          {"pool": "ma", "line": line_no, "model": c["model"]}))
    pref_hh, pref_ma = pref_rows(ren, pools, exclude, a.seed)
    pref_hh = [r for r in pref_hh if len(r["target"].split()) <= max_words and usable_chosen(r["target"], a.min_chosen_words)]
    pref_ma = [r for r in pref_ma if len(r["target"].split()) <= max_words and len(r["response"].split()) <= max_words]
    plan = [("fix", "hh", fix["hh"], a.fix_hh), ("fix", "redteam", fix["redteam"], a.fix_redteam),
            ("fix", "general", fix["general"], a.fix_general), ("fix", "samples", fix["samples"], a.fix_samples),
            ("keep", "redteam", keep["redteam"], a.keep_redteam), ("keep", "general", keep["general"], a.keep_general),
            ("keep", "hh", keep["hh"], a.keep_hh), ("keep", "ma", keep["ma"], a.keep_ma),
            ("keep", "samples", keep["samples"], a.keep_samples),
            ("pref", "hh", pref_hh, a.pref_hh), ("pref", "ma", pref_ma, a.pref_ma)]
    rows, report = [], []
    for kind, pool, cands, n in plan:
        cap = a.max_refusal_share if kind != "keep" else a.max_keep_refusal_share
        got = sample(cands, n, rng, cap, cap_only=kind == "keep")
        rows += got
        report.append({"kind": kind, "pool": pool, "available": len(cands), "asked": n, "used": len(got),
                       "refusal_targets": sum(is_refusal(r["target"]) for r in got)})
    if a.fix_declines:  # its own draw, so a mix without declines rebuilds as before
        used = {r["source"]["row"] for r in rows if r["kind"] == "fix" and r["source"]["pool"] == "samples"}
        cands = [r for r in fix["declines"] if r["source"]["row"] not in used]
        got = sample(cands, a.fix_declines, random.Random(a.seed + 1))
        rows += got
        report.append({"kind": "fix", "pool": "declines", "available": len(cands), "asked": a.fix_declines,
                       "used": len(got), "refusal_targets": sum(is_refusal(r["target"]) for r in got)})
    if a.fix_tics:  # its own draw too: a weak answer behind a tic opening -> the target without it
        r_tic = random.Random(a.seed + 2)
        weak_texts = [r["response"] for f in ("samples", "redteam", "general") if (weak / f"{f}.jsonl").exists()
                      for r in read_jsonl(weak / f"{f}.jsonl")]
        tics = tic_openings(weak_texts)
        used = {r["source"]["row"] for r in rows if r["kind"] == "fix" and r["source"]["pool"] in ("samples", "declines")}
        cands = [r for r in fix["samples"] if r["source"]["row"] not in used and not is_refusal(r["response"])
                 and not is_refusal(r["target"])]
        got = []
        for r in sample(cands, a.fix_tics, r_tic):
            tic = r_tic.choice(tics)
            got.append(ren_tics.row(f"{r['id']}:tic", "fix", r["query"], f"{tic} {r['response']}", r["target"],
                                    HH_OBJECTIVES, {**r["source"], "pool": "tics", "tic": tic}))
        rows += got
        report.append({"kind": "fix", "pool": "tics", "available": len(cands), "asked": a.fix_tics,
                       "used": len(got), "refusal_targets": sum(is_refusal(r["target"]) for r in got),
                       "tic_openings": len(tics)})
    rng.shuffle(rows)
    out = Path(a.output)
    for sp in ("train", "validation"):
        (out / sp).mkdir(parents=True, exist_ok=True)
        for st in ("warmup", "equal", "preference"):
            (out / sp / f"{st}.jsonl").write_text("", encoding="utf-8")
    with open(out / "train" / f"{a.stage}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            r["stage"] = a.stage
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats = {"settings": vars(a), "rows": len(rows), "parts": report,
             "refusal_targets": sum(is_refusal(r["target"]) for r in rows)}
    (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for p in report:
        print(f"{p['kind']:<5} {p['pool']:<8} {p['used']:>4} of {p['available']:>5} (asked {p['asked']}), "
              f"{p['refusal_targets']} refusal targets", file=sys.stderr)
    print(f"{len(rows)} rows -> {out / 'train' / (a.stage + '.jsonl')}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pools", help="training query pools (test queries and dev instructions kept out)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--exclude-instructions", action="append", help="JSONL with 'query' = instructions to keep out")
    p.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("build", help="stage files for metaalign train from the pools and the weak answers")
    b.add_argument("--pools", required=True)
    b.add_argument("--weak", required=True, help="directory with the weak policy's hh/redteam/general/samples.jsonl")
    b.add_argument("-o", "--output", required=True)
    b.add_argument("--exclude-instructions", action="append")
    b.add_argument("--template", default="hh-rlhf")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--stage", default="preference", choices=["warmup", "equal", "preference"])
    b.add_argument("--max-target-words", type=int, default=300)
    b.add_argument("--min-chosen-words", type=int, default=12,
                   help="HH-RLHF chosen turns shorter than this (or short questions back) are not used")
    b.add_argument("--max-refusal-share", type=float, default=None,
                   help="at most this share of each fix/pref part may have a refusal target")
    b.add_argument("--max-keep-refusal-share", type=float, default=None,
                   help="at most this share of each keep part may be a refusal (short strong answers mostly are)")
    b.add_argument("--keep-samples-models", default="claude", choices=["claude", "gpt35", "claude,gpt35"],
                   help="whose answers to the samples rows are keep candidates (Claude-3, gpt-3.5-turbo, or both)")
    for kind, pools_ in (("fix", ("hh", "redteam", "general", "samples")), ("keep", ("hh", "redteam", "general", "ma", "samples")),
                         ("pref", ("hh", "ma"))):
        for pool in pools_:
            b.add_argument(f"--{kind}-{pool}", type=int, default=0, help=f"{kind} rows from the {pool} pool")
    b.add_argument("--fix-declines", type=int, default=0,
                   help="fix rows from the samples pool whose target is Claude-3's refusal with its refusal "
                        "sentences cut (decline_target), for rows no samples fix row uses")
    b.add_argument("--fix-tics", type=int, default=0,
                   help="fix rows from the samples pool (rows no other samples row uses, neither answer a refusal) "
                        "whose weak answer gets one of the weak policy's own refusal-like first sentences in front "
                        "(tic_openings); the target is the plain one, so the corrector learns to drop the tic")
    a = ap.parse_args()
    (cmd_pools if a.cmd == "pools" else cmd_build)(a)


if __name__ == "__main__":
    main()
