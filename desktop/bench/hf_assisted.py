"""The single-machine reference: transformers' own assisted generation with the same target, in one process.

``specd bench`` runs this as a child process (``python -m specd.desktop.bench.hf_assisted``) pinned to the
verifier's cores after the verifier has stopped, so it gets the same cores and threads the target had, and
its memory is returned afterwards. It needs a torch draft: the configured draft when it is a Hugging Face
model different from the target; when draft and target are the same model (the embedded pair, whose
draft is an int4 build of the target), the assistant is the target with its linear layers dynamically
quantised to int8 (torch's counterpart of the int4 edge draft).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from specd.desktop.bench.prompts import select_prompts


def measure(target_dir: str, draft_dir: str, *, prompts: int, max_new_tokens: int, temperature: float,
            top_p: float, seed: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    same = Path(target_dir).resolve() == Path(draft_dir).resolve()
    if same:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assistant = quantize_dynamic(AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32),
                                         {torch.nn.Linear}, dtype=torch.qint8).eval()
        assistant_name = f"{Path(target_dir).name} (torch dynamic int8)"
    else:
        assistant = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
        assistant_name = Path(draft_dir).name
    sampling: dict[str, Any] = ({"do_sample": False} if temperature == 0 else
                                {"do_sample": True, "temperature": temperature, "top_p": top_p})
    eos = target.generation_config.eos_token_id
    pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)

    def run(text: str, assisted: bool, tokens: int) -> tuple[int, float]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = target.generate(**ids, max_new_tokens=tokens, pad_token_id=pad,
                                  assistant_model=assistant if assisted else None, **sampling)
        return int(out.shape[1] - ids["input_ids"].shape[1]), time.perf_counter() - start

    chosen = select_prompts(prompts)
    run(chosen[0].text, False, 4)
    run(chosen[0].text, True, 4)
    totals = {False: [0, 0.0], True: [0, 0.0]}
    for prompt in chosen:
        for assisted in (False, True):  # take turns, like the main bench
            n, s = run(prompt.text, assisted, max_new_tokens)
            totals[assisted][0] += n
            totals[assisted][1] += s
    plain = totals[False][0] / totals[False][1]
    fast = totals[True][0] / totals[True][1]
    note = ("Draft and target are the same model here, so the assistant is the target dynamically quantised to "
            "int8 by torch." if same else "")
    return {"target": Path(target_dir).name, "assistant": assistant_name, "threads": threads,
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "answers": len(chosen), "settings": f"temperature {temperature:g}, max {max_new_tokens} new tokens",
            "plain_tokens": totals[False][0], "plain_s": totals[False][1], "plain_tokens_per_second": plain,
            "assisted_tokens": totals[True][0], "assisted_s": totals[True][1], "assisted_tokens_per_second": fast,
            "assisted_speedup": fast / plain if plain else 0.0, "note": note}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specd.desktop.bench.hf_assisted",
                                description="transformers assisted generation against plain generate, as JSON")
    p.add_argument("--target", required=True, help="Hugging Face folder of the target")
    p.add_argument("--draft", required=True, help="Hugging Face folder of the torch draft (same as target: int8)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True, help="where to write the result")
    args = p.parse_args(argv)
    try:
        result = measure(args.target, args.draft, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, threads=args.threads)
    except Exception as exc:  # reported in the bench's report, not a crash of the bench
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
