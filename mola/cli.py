"""Library commands: `mola train`, `mola analyze` and `mola generate`.

`add_commands` registers them on the full `mola` command (see service/cli.py); `python -m mola`
runs them alone. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _add_train(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a MoLA (or LoRA) adapter on a dataset", description="Train an adapter and save it to --output.")
    p.add_argument("--model", required=True, help="base model: tiny-llama, smollm2-135m-instruct, a local directory or a cached hub id")
    p.add_argument("--data", required=True, help="training data: JSONL (alpaca, chat, prompt/completion or text rows) or a save_to_disk folder")
    p.add_argument("--eval-data", help="evaluation data (same formats); eval loss is reported")
    p.add_argument("--split", default="train", help="the split of a save_to_disk --data folder with several (default: train)")
    p.add_argument("--eval-split", default="validation", help="the split of a save_to_disk --eval-data folder with several (default: validation)")
    p.add_argument("--output", required=True, help="folder for the adapter (and checkpoints/ inside it)")
    p.add_argument("--method", choices=["mola", "lora"], default="mola")
    p.add_argument("--experts", default="2468", help="allocation: '2468', '2,4,6,8', one entry per layer, or 'inverted_triangle:5'")
    p.add_argument("--top-k", default="2", help="experts per token: an int or a comma list per layer")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", help="comma-separated target modules (default: the architecture's)")
    p.add_argument("--aux-loss-coef", type=float, default=0.001)
    p.add_argument("--match-mola", action="store_true", help="with --method lora: per-module ranks matching the MoLA allocation's parameters")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine", help="decay after the warm-up")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: --warmup-ratio of the total)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up as a fraction of the total steps, without --warmup-steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--train-on-inputs", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int)
    p.add_argument(
        "--eval-generate", type=int, metavar="N",
        help="at each evaluation, also generate the completions of the first N --eval-data rows: exact match, and answer accuracy where they say 'the answer is X'",
    )
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in OUTPUT/checkpoints, and the one with the lowest eval_loss (0: all)")
    p.add_argument("--resume", help="checkpoint folder to resume from ('latest' picks the newest in --output)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (faster steps after a slower start)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA when supported)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--cache-dir", help="where converted models are cached")
    p.set_defaults(handler=cmd_train)


def _add_analyze(subparsers: Any) -> None:
    p = subparsers.add_parser("analyze", help="expert redundancy and routing statistics of a saved MoLA adapter")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors), or a job's .tar.gz")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--data", help="dataset to gather routing statistics over")
    p.add_argument("--limit", type=int, default=64, help="rows of --data to route")
    p.add_argument("--cutoff-len", type=int, default=256, help="tokens of each --data row routed (longer rows are cut)")
    p.add_argument("--json", dest="json_path", help="also write the full analysis as JSON here")
    p.add_argument("--cache-dir")
    p.set_defaults(handler=cmd_analyze)


def _add_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate with a trained adapter (MoLA or LoRA) from prompts or a dataset's rows",
        description="Load an adapter onto its base model and generate. Prompts are formatted as training formatted its rows.",
    )
    p.add_argument("adapter", help="adapter folder, or the .tar.gz a job's download gives")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="a prompt (repeat for several; - reads one from stdin)")
    what.add_argument("--data", help="JSONL (or save_to_disk folder) in a training format: each row's prompt is generated from and its reference scored")
    p.add_argument(
        "--template",
        choices=["alpaca", "chat", "raw"],
        help="how --prompt is formatted: as an Alpaca instruction, a chat user turn, or as it is (default: as the adapter's training rows were, which it records; alpaca for an adapter that does not)",
    )
    p.add_argument("--input", help="with --template alpaca: the Alpaca input that goes with the instruction")
    p.add_argument("--split", default="train", help="the split of a save_to_disk --data folder with several (default: train)")
    p.add_argument("--limit", type=int, help="--data rows to use, from the first (default: all)")
    p.add_argument("--cutoff-len", type=int, help="with --data: the training run's --cutoff-len, for the rows' loss (default: 256, training's)")
    p.add_argument("--train-on-inputs", action="store_true", help="with --data: the run trained on its prompts too (the loss counts them, as its eval loss did)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling")
    p.add_argument("--seed", type=int, help="makes sampling repeatable")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 weights (default: on CUDA when supported)")
    p.add_argument("--json", dest="json_path", help="also write prompts, generations (and references, scores) as JSON here")
    p.add_argument("--cache-dir")
    p.set_defaults(handler=cmd_generate)


def add_commands(subparsers: Any) -> None:
    _add_train(subparsers)
    _add_analyze(subparsers)
    _add_generate(subparsers)


def _parse_top_k(text: str) -> int | list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--top-k: {text!r} is not an integer or a comma list of integers") from None
    return values[0] if len(values) == 1 else values


def _device(requested: str | None) -> str:
    """``--device``, checked before any model is loaded: torch reports a missing CUDA with an
    AssertionError traceback from deep inside the first transfer."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"--device {requested!r}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {requested}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return requested


def _refuse_other_runs(output: Path, resume: str | None) -> None:
    """A new run into a folder holding another run's checkpoints would have its own checkpoints
    deleted by the rotation (the other run's steps are higher) and `--resume latest` would pick
    theirs; checked before the model loads (`train` refuses it too)."""
    from mola.train import list_checkpoints

    found = list_checkpoints(output / "checkpoints")
    if found and not resume:
        raise ValueError(
            f"--output {output} already holds checkpoints of another run (newest: {found[-1]}): "
            "pass --resume latest to continue that run, or choose another --output"
        )


def _check_split(flag: str, path: str, split_flag: str, split: str) -> None:
    """A save_to_disk folder with several splits must have the one asked for; the error names
    the flag that chooses it. (Files and single-split folders have no splits to choose.)"""
    index = Path(path) / "dataset_dict.json"
    if index.is_file():
        splits = [str(name) for name in json.loads(index.read_text()).get("splits", [])]
        if split not in splits:
            raise ValueError(f"{flag} {path} has no split {split!r} (it has {', '.join(splits) or 'none'}): choose one with {split_flag}")


def _load_examples(flag: str, path: str, tokenizer: Any, config: Any, split_flag: str, split: str) -> Any:
    """Tokenized examples of ``path`` (its ``split``, for a folder with several); an error
    rather than a run without them."""
    from mola.data import load_training_data

    _check_split(flag, path, split_flag, split)
    examples = load_training_data(path, tokenizer, cutoff_len=config.cutoff_len, train_on_inputs=config.train_on_inputs, split=split)
    if not examples:
        raise ValueError(f"{flag} {path}: no example to use (no rows, or none keeps a trainable token within --cutoff-len {config.cutoff_len})")
    stats = examples.stats
    if stats.over_cutoff:
        print(
            f"{flag} {path}: {stats.over_cutoff} of {stats.records} records longer than --cutoff-len {config.cutoff_len} "
            f"were cut, {stats.dropped_at_cutoff} of them dropped (no completion token left)",
            file=sys.stderr,
        )
    return examples


def _generation_scorer(args: argparse.Namespace, tokenizer: Any, config: Any) -> Any:
    """--eval-generate N: ``train``'s extra_eval scoring the generated completions of the first
    N --eval-data rows that fit in --cutoff-len."""
    from mola.data import generation_rows
    from mola.evaluate import CompletionScorer

    if not args.eval_data or args.eval_generate < 1:
        raise ValueError("--eval-generate needs --eval-data and a count of at least 1")
    rows = generation_rows(args.eval_data, tokenizer, config.cutoff_len, limit=args.eval_generate, split=args.eval_split)
    if not rows:
        raise ValueError(f"--eval-generate: none of the first {args.eval_generate} --eval-data rows has a prompt whose prompt and completion fit in --cutoff-len {config.cutoff_len}")
    return CompletionScorer(rows, tokenizer, batch_size=config.micro_batch_size)


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from mola.config import MolaConfig
    from mola.data import prompt_template_for
    from mola.lora import get_lora_model, matched_alpha_pattern, matched_rank_pattern
    from mola.model import get_mola_model
    from mola.models import load_base_model
    from mola.train import TrainConfig, list_checkpoints, save_adapter, train

    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    mola_config = MolaConfig(experts=args.experts, top_k=_parse_top_k(args.top_k), rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets, aux_loss_coef=args.aux_loss_coef)
    config = TrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
        seed=args.seed, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, torch_compile=args.compile,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
    )
    output = Path(args.output)
    _refuse_other_runs(output, args.resume)
    device = _device(args.device)
    model, tokenizer = load_base_model(args.model, device=device, cache_dir=args.cache_dir)
    train_data = _load_examples("--data", args.data, tokenizer, config, "--split", args.split)
    # Recorded with the adapter, so `mola generate` dresses a prompt as these rows were.
    config = dataclasses.replace(config, prompt_template=prompt_template_for(train_data.formats))
    # The eval loss is on the tokens training learns (train_on_inputs included), as in the service.
    # Its split defaults to validation: the same folder as --data would else be read at its train split.
    eval_data = _load_examples("--eval-data", args.eval_data, tokenizer, config, "--eval-split", args.eval_split) if args.eval_data else None
    extra_eval = _generation_scorer(args, tokenizer, config) if args.eval_generate is not None else None
    torch.manual_seed(config.seed)
    if args.method == "mola":
        model = get_mola_model(model, mola_config)
    else:
        pattern = matched_rank_pattern(model, mola_config) if args.match_mola else None
        # Keep alpha / rank equal to MoLA's scaling, so one learning rate fits both.
        alphas = matched_alpha_pattern(pattern, mola_config.scaling) if pattern else None
        model = get_lora_model(model, rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets, rank_pattern=pattern, alpha_pattern=alphas)

    checkpoints = output / "checkpoints"
    resume = None
    if args.resume == "latest":
        found = list_checkpoints(checkpoints)
        resume = found[-1] if found else None
        if resume is None:
            logger.info("no checkpoint in %s: starting a new run", checkpoints)
    elif args.resume:
        resume = Path(args.resume)

    bar = tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_event(event: dict[str, Any]) -> None:
        if bar.total is None:
            bar.reset(total=event["total_steps"])
        if event["kind"] == "train":
            bar.n = event["step"]
            bar.set_postfix(loss=f"{event['loss']:.4f}", aux=f"{event['aux_loss']:.3f}", lr=f"{event['lr']:.2e}", refresh=False)
            bar.refresh()
        elif event["kind"] == "eval":
            generated = f", exact match {event['eval_exact_match']:.1%}" if "eval_exact_match" in event else ""
            answers = f", answers right {event['eval_answer_accuracy']:.1%}" if "eval_answer_accuracy" in event else ""
            bar.write(f"step {event['step']}: eval_loss {event['eval_loss']:.4f}{generated}{answers}")

    try:
        result = train(
            model, tokenizer, train_data, eval_data, config, callback=on_event, checkpoint_dir=checkpoints, resume_from=resume, extra_eval=extra_eval
        )
    finally:
        bar.close()
    save_adapter(model, output, config.prompt_template)
    data = {"train": train_data.stats.to_dict(), **({"eval": eval_data.stats.to_dict()} if eval_data else {})}
    summary = {"output": str(output), "steps": result.steps, "metrics": result.metrics, "eval": result.eval_metrics, "data": data}
    if extra_eval is not None:  # the last evaluation's first generations beside their references
        summary["samples"] = extra_eval.samples
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    from mola.analysis import expert_redundancy, expert_report
    from mola.data import collate, load_training_data
    from mola.generate import open_adapter

    with open_adapter(args.adapter, model=args.model, cache_dir=args.cache_dir) as adapter:
        if adapter.kind != "mola":
            raise ValueError(f"{args.adapter} does not describe a MoLA adapter (a LoRA adapter has no experts to analyse)")
        model, tokenizer, description, base_name = adapter.model, adapter.tokenizer, adapter.description, adapter.base_model
    report: dict[str, Any] = {"adapter": str(args.adapter), "base_model": base_name, "redundancy": expert_redundancy(model)}
    print(f"adapter {args.adapter} on {base_name}: {description['total_experts']} experts, rank {description['rank']}")
    print("layer  experts  top_k  mean ||dW_i - dW_j||_F  mean ||dW_e||_F  distance / norm")
    for row in report["redundancy"]["layers"]:
        distance, relative = ("-" if row[k] is None else f"{row[k]:.5f}" for k in ("mean_distance", "relative_distance"))
        print(f"{row['layer']:>5}  {row['num_experts']:>7}  {description['top_k_per_layer'][row['layer']]:>5}  {distance:>22}  {row['mean_norm']:>15.5f}  {relative:>15}")
    if args.data:
        # Routing needs no labels: train_on_inputs labels every token, so no row is dropped for
        # want of a trainable token within the cutoff (with the loss on responses, rows whose
        # prompt fills the cutoff were, and the tables could come out empty).
        data = load_training_data(args.data, tokenizer, cutoff_len=args.cutoff_len, train_on_inputs=True)[: args.limit]
        if not data:
            raise ValueError(f"--data {args.data}: no row to route")
        batches = [collate(data[i : i + 8], tokenizer.pad_token_id) for i in range(0, len(data), 8)]
        # routing_statistics' rows with their loads (and the redundancy again): what the service stores.
        report["routing"] = expert_report(model, batches)
        print("\nbusiest / idlest: an expert's share of the tokens over the fair share top_k / experts (1 = balanced)")
        print("layer  busiest  idlest  selection share per expert")
        for row in report["routing"]["layers"]:
            print(f"{row['layer']:>5}  {row['max_load']:>7.2f}  {row['min_load']:>6.2f}  " + " ".join(f"{s:.2f}" for s in row["selection_share"]))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _generation_requests(args: argparse.Namespace, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """``([{"prompt", "special", "reference"?, "name"?}], records)``: the --prompt texts in
    --template (records None), or the --data rows with a prompt, rendered as training rendered
    them (a text row has none), and the --data records they come from (text rows included)."""
    from mola.data import read_records
    from mola.generate import prompt, reference_rows

    if args.prompt:
        # A piped prompt (`echo ... |`) ends with a newline that is not part of it.
        texts = [sys.stdin.read().rstrip("\n") if text == "-" else text for text in args.prompt]
        if args.cutoff_len is not None or args.train_on_inputs:
            raise ValueError("--cutoff-len and --train-on-inputs go with --data (they say how its rows' loss is measured)")
        return [dict(zip(("prompt", "special"), prompt(text, tokenizer, args.template, args.input))) for text in texts], None
    if args.cutoff_len is None:
        args.cutoff_len = 256  # training's default
    if args.cutoff_len < 2:
        raise ValueError(f"--cutoff-len must be at least 2 (a token and the next to predict), got {args.cutoff_len}")
    if args.input is not None:
        raise ValueError("--input goes with --prompt (the rows of --data carry their own inputs)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    _check_split("--data", args.data, "--split", args.split)
    records = read_records(args.data, split=args.split)[: args.limit]
    try:
        rows = reference_rows(records, tokenizer)
    except ValueError as error:
        raise ValueError(f"--data {args.data}: {error}") from error
    if not rows:
        raise ValueError(f"--data {args.data}: no row with a prompt to generate from (text rows have none)")
    if len(rows) < len(records):
        print(f"--data {args.data}: {len(records) - len(rows)} of {len(records)} rows have no prompt (text rows) and are left out", file=sys.stderr)
    return [{"prompt": row.prompt, "special": row.special, "reference": row.reference, "name": f"--data row {row.row}"} for row in rows], records


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from mola.evaluate import records_loss, score_generations
    from mola.generate import generate, open_adapter
    from mola.models import bf16_by_default

    if args.template not in (None, "alpaca") and args.input is not None:
        raise ValueError(f"--input goes with --template alpaca, not {args.template}")
    device = _device(args.device)
    bf16 = bf16_by_default(device) if args.bf16 is None else args.bf16
    with open_adapter(args.adapter, model=args.model, device=device, dtype=torch.bfloat16 if bf16 else None, cache_dir=args.cache_dir) as adapter:
        if args.template is None:
            args.template = adapter.prompt_template or "alpaca"
            if args.prompt and adapter.prompt_template is None:
                print("the adapter does not record how its training prompts looked: --prompt is formatted as an Alpaca instruction (--template)", file=sys.stderr)
        if args.template != "alpaca" and args.input is not None:
            raise ValueError(f"--input goes with the alpaca template, and the adapter's training rows were {args.template} (--template)")
        rows, records = _generation_requests(args, adapter.tokenizer)
        generations = generate(
            adapter.model,
            adapter.tokenizer,
            [(row["prompt"], row["special"]) for row in rows],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
            names=[row["name"] for row in rows] if args.data else None,
        )
        loss = records_loss(adapter.model, adapter.tokenizer, records, args.cutoff_len, args.train_on_inputs, args.batch_size) if args.data else {}
    report: dict[str, Any] = {
        "adapter": str(args.adapter),
        "kind": adapter.kind,
        "base_model": adapter.base_model,
        "settings": {k: getattr(args, k) for k in ("template", "max_new_tokens", "temperature", "top_p", "seed")},
        "rows": [{"prompt": row["prompt"], "generated": text, **({"reference": row["reference"]} if "reference" in row else {})} for row, text in zip(rows, generations)],
    }
    for i, row in enumerate(report["rows"]):
        if len(rows) > 1 or "reference" in row:
            print(f"### {i + 1}")
        if "reference" in row:
            print(scored_row(row["prompt"], row["reference"], row["generated"]))
        else:
            print(row["generated"])
    if args.data:
        scores = {**score_generations(generations, [row["reference"] for row in rows]), **loss}
        report["scores"] = scores
        print(f"\n{scores_line(scores)}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def scored_row(prompt: str, reference: str, generated: str) -> str:
    """A scored row on three lines (`mola generate --data`, `mola jobs generate --dataset`)."""
    return f"prompt:    {_one_line(prompt, keep_end=True)}\nreference: {_one_line(reference)}\ngenerated: {_one_line(generated)}"


def scores_line(scores: dict[str, Any]) -> str:
    """`mola.evaluate.score_generations`'s scores in words, with the loss (`records_loss`) when
    there is one."""
    answers = "" if scores["answer_accuracy"] is None else f"; answer accuracy {scores['answer_accuracy']:.1%} of {scores['answers_expected']} rows that give one"
    loss = f"; loss {scores['loss']:.4f} over {scores['loss_tokens']} tokens" if scores.get("loss") is not None else ""
    return f"exact match {scores['exact_match']:.1%} of {scores['n']} rows{answers}{loss}"


def _one_line(text: str, width: int = 200, keep_end: bool = False) -> str:
    """A text on one line (newlines shown as \\n), cut to ``width`` characters: its start, or
    with ``keep_end`` its end (where a rendered prompt has its question, after the template)."""
    flat = text.replace("\n", "\\n")
    if len(flat) <= width:
        return flat
    return "..." + flat[3 - width :] if keep_end else flat[: width - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mola", description="Train and analyse MoLA adapters.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_commands(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # mola.train.TrainingDiverged: the run failed, not the command line
        print(f"error: {error}", file=sys.stderr)
        return 1
