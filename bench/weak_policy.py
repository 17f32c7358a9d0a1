"""A weak policy's answers to held-out HH-RLHF queries, for judging correctors on them.

The policy is SmolLM2-135M-Instruct (the embedded GGUF) answering greedily (128 tokens) through
its chat template; the queries are a seeded sample of the paper's HH-RLHF test queries
(shared/data/metaaligner-samples/hh-rlhf/gpt-3.5-turbo.csv, left out of all training data by
`build-data --exclude-queries`), with their golden responses. Output JSONL: id, query,
response (the weak answer), golden, objectives [harmless, helpful] -- ready for
`metaalign correct` and then `metaalign judge`.

    python bench/weak_policy.py 32 out/heldout-hh-weak.jsonl
"""
from __future__ import annotations

import csv
import json
import random
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "metaaligner-samples" / "hh-rlhf" / "gpt-3.5-turbo.csv"


def to_messages(query: str) -> list[dict]:
    """HH-RLHF "\\n\\nHuman: ...\\n\\nAssistant: ..." context (ending in "Assistant:") as chat turns."""
    body = "\n\n" + query.strip().removesuffix("Assistant:").strip()
    parts = re.split(r"\n\n(Human|Assistant): ", body)
    return [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(parts[1::2], parts[2::2])]


def main() -> None:
    from llama_cpp import Llama

    from metaalign_cli.backends import default_model_path

    n, out = int(sys.argv[1]), sys.argv[2]
    rows = list(csv.DictReader(open(DATA, encoding="utf-8")))
    random.Random(0).shuffle(rows)
    llm = Llama(model_path=str(default_model_path()), n_ctx=2048, n_threads=2, verbose=False)
    with open(out, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows[:n]):
            res = llm.create_chat_completion(to_messages(r["query"]), max_tokens=128, temperature=0.0,
                                             repeat_penalty=1.0)
            f.write(json.dumps({"id": f"hh-test-{i}", "query": r["query"],
                                "response": res["choices"][0]["message"]["content"].strip(),
                                "golden": r["goldens"], "objectives": ["harmless", "helpful"]},
                               ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
