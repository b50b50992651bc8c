"""Build athletes.json: Fact Finding's athletes -> sport setting from LRE's athletes relation.

Nanda et al. 2023 ("Fact Finding", DeepMind) prompt a model with a one-shot prefix:
"Fact: Tiger Woods plays the sport of golf\\nFact: {athlete} plays the sport of". Their athlete
list is not public; LRE's factual/person_plays_pro_sport relation (Hernandez et al. 2023, MIT)
is the closest public set: 318 athletes of five sports. This script writes every LRE sample
except the prefix's own example (Tiger Woods, who is not in LRE today; the check guards a
future LRE version) in the record format factfind.load_facts reads, with LRE's JSON escapes
decoded.

Run from the repository root (deterministic; the output is committed):

    python datasets/fact_finding/build_athletes.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
LRE = HERE.parent / "lre" / "factual" / "person_plays_pro_sport.json"
PREFIX = "Fact: Tiger Woods plays the sport of golf\n"
TEMPLATE = "Fact: {} plays the sport of"
EXAMPLE = "Tiger Woods"


def _decode(text: str) -> str:
    """LRE escaped a few names twice ("Bras\\\\u00edlia"); decode what json.loads left."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def build() -> list[dict[str, str]]:
    lre = json.loads(LRE.read_text(encoding="utf-8"))
    records = []
    for j, sample in enumerate(lre["samples"]):
        subject, sport = _decode(sample["subject"]), _decode(sample["object"])
        if subject == EXAMPLE:
            continue
        records.append({"subject": subject, "relation": lre["name"], "template": TEMPLATE,
                        "attribute": sport, "prefix": PREFIX, "source": f"{LRE.name}#{j}"})
    return records


if __name__ == "__main__":
    out = HERE / "athletes.json"
    records = build()
    out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} facts to {out}")
