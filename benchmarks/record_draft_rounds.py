"""Record the draft rounds `specd-verifier capacity` replays: the real edge draft against the real target.

    .venv/bin/python benchmarks/record_draft_rounds.py [--out daemon/draft_rounds.json] [--gamma 8] [--prompts N]
        [--precision auto|int4|int8|fp16|fp32]

The draft is the configured edge draft exactly as `specd chat` opens it on the CPU (the embedded
default: SmolLM2-135M-Instruct through ONNX Runtime GenAI, at ``[models] draft_precision``, which
``--precision`` overrides: ``auto`` picks int8 on a 2-core x86 CPU, int4 is the weaker draft); the
target is [models] target through transformers. Each round the draft proposes γ tokens greedily and
the target keeps the longest prefix it agrees with plus its own next token (greedy verification), so a
replay at any γ' ≤ γ knows how many of its first γ' drafts the target accepted. Kept outside the
package: it needs the desktop drafters, which the daemon never imports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from specd.desktop.bench.prompts import PROMPTS
from specd.desktop.drafters import load_drafter
from specd.shared.config import load_config
from specd.shared.models import ensure_hf_folder, resolve_source
from specd.shared.sampling import SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="daemon/draft_rounds.json")
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the bench prompts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--precision", choices=("auto", "int4", "int8", "fp16", "fp32"),
                        help="draft precision (default: [models] draft_precision of the config)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(None, {"models": {"draft_precision": args.precision}})
    drafter, choice = load_drafter(config, "cpu", progress=lambda msg: print(msg, file=sys.stderr))
    folder = ensure_hf_folder(resolve_source(config.models.target), cache_override=config.models.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    target = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    greedy = SamplingParams(temperature=0.0)
    sessions = []
    for prompt in PROMPTS[: args.prompts]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        committed, rounds = list(ids), []
        while len(committed) - len(ids) < args.new_tokens:
            drafts = drafter.propose(committed, args.gamma, greedy, 1, 0).tokens
            with torch.inference_mode():
                logits = target(torch.tensor([committed + drafts])).logits[0, len(committed) - 1:]
            choices = logits.argmax(-1).tolist()  # the target's token after each prefix
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
                accepted += 1
            rounds.append({"drafts": drafts, "accepted": accepted})
            committed += [*drafts[:accepted], choices[accepted]]
        sessions.append({"prompt_id": prompt.id, "prompt": ids, "rounds": rounds})
        rate = sum(r["accepted"] for r in rounds) / sum(len(r["drafts"]) for r in rounds)
        print(f"{prompt.id}: {len(rounds)} rounds, acceptance {rate:.2f}", file=sys.stderr)
    recording = {"draft": f"{config.models.draft} ({choice.row.id}, {drafter.model_name})",
                 "target": config.models.target, "gamma": args.gamma, "verification": "greedy",
                 "command": "benchmarks/record_draft_rounds.py " + " ".join(sys.argv[1:]), "sessions": sessions}
    Path(args.out).write_text(json.dumps(recording, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
