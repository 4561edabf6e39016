"""How much of the prompt sharing the vLLM backend's cache classes keep, by KV block size.

    python bench/prefix_sharing.py                  # the bundled AlpacaEval pool, all items
    python bench/prefix_sharing.py --blocks 16 32

No engine: this runs `prefix_cache_classes` on the tokenized pool and counts. Per block size: how many
salt classes one call needs, how many times a prompt is computed (once per instruction and class) against
the minimum (once per instruction), and the prompt tokens the cache can serve against what sharing could
save at most (every candidate after the first reusing its whole prompt). A candidate reads whole blocks
only, up to the block before its first scored row, so the last column stays under 100% even with one
class per instruction.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from grape.formatting import prompt_ids, resolve_template, response_ids
    from grape.models import resolve_model
    from workers.backends.base import ScoreRequest
    from workers.backends.vllm import prefix_cache_classes

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    tpl = resolve_template(tok, "auto")
    requests = []
    for line in args.data.read_bytes().splitlines():
        item = orjson.loads(line)
        p = prompt_ids(tok, item, tpl)
        requests += [ScoreRequest(p, response_ids(tok, c["response"], tpl)) for c in item["candidates"]]
    prompts: dict[tuple[int, ...], int] = defaultdict(int)
    for r in requests:
        prompts[tuple(r.prompt_ids)] += 1
    shareable = sum(len(p) * (n - 1) for p, n in prompts.items())
    print(f"{len(requests)} pairs, {len(prompts)} distinct prompts, {shareable} prompt tokens shareable at most")
    print(f"{'block':>5} {'classes':>7} {'prompt runs':>11} {'minimum':>7} {'runs saved':>10} {'tokens read':>11}")
    for block in args.blocks:
        classes = prefix_cache_classes(requests, block)
        seen: set[tuple[tuple[int, ...], int]] = set()
        read = 0
        for r, c in zip(requests, classes, strict=True):
            key = (tuple(r.prompt_ids), c)
            if key in seen:  # a later candidate of its class: it reads the prompt's whole blocks
                read += block * ((len(r.prompt_ids) - 1) // block)
            seen.add(key)
        saved = (len(requests) - len(seen)) / (len(requests) - len(prompts))
        print(
            f"{block:>5} {max(classes) + 1:>7} {len(seen):>11} {len(prompts):>7} {saved:>10.0%} "
            f"{read / shareable:>11.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
