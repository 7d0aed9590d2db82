"""Evaluation: held-out loss, multiple-choice accuracy by likelihood, generation accuracy, and
generated completions compared with their references.

All take any causal LM whose ``model(input_ids=..., attention_mask=...)`` returns an object
with ``.logits`` (a `MolaModel`, a peft model, a plain Hugging Face model), run it in eval mode
without gradients, and put every module back in the train/eval mode it was in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.architectures import max_positions
from mola.data import IGNORE_INDEX, collate, load_training_data
from mola.logits import forward_logits_at, next_token_positions, to_device

logger = logging.getLogger(__name__)

# "The answer is B", "the correct answer is answer4", "Answer: The answer is (C).", "answer is: yes"
# A signed decimal number first ("-3", "3.5"), else a word or letter.
ANSWER_PATTERN = re.compile(r"answer\s+is\s*:?\s*\(?\s*(-?\d+(?:\.\d+)?(?![A-Za-z0-9_])|[A-Za-z0-9_]+)", re.IGNORECASE)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; afterwards each module's own previous mode (a frozen part of a
    training model may have been in eval mode on purpose, so a blanket ``train()`` is wrong)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def maybe_autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` to ``dtype`` on ``device``; nothing when ``dtype`` is None."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


def _check_positions(model: nn.Module, named_lengths: Iterable[tuple[str, int]], fix: str) -> None:
    """A ValueError naming the first ``(what, length)`` longer than the model's positions
    (GPT-2's position embeddings fail with an index error deep inside; rotary models run past
    what they were trained on), as `mola.train.train` refuses such examples."""
    positions = max_positions(model)
    if positions is None:
        return
    for what, length in named_lengths:
        if length > positions:
            raise ValueError(f"{what} is {length} tokens but the model has {positions} positions: {fix}")


# ---- loss ------------------------------------------------------------------------------------


def evaluate_loss(
    model: nn.Module,
    examples: Sequence[dict[str, Sequence[int]]],
    pad_token_id: int,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | int]:
    """Token-weighted mean cross-entropy over the labelled tokens (labels != -100) of
    ``examples`` (as made by `mola.data.load_training_data`).

    Every labelled token weighs the same whatever its example's length, so the result does not
    depend on ``batch_size``. Returns ``{"eval_loss": float, "eval_tokens": int}``; the loss is
    NaN when no token is labelled.
    """
    lengths = ((f"example {i}", len(e["input_ids"])) for i, e in enumerate(examples))
    _check_positions(model, lengths, "tokenize with cutoff_len <= the model's positions")
    device = model_device(model)
    # Sorting by length keeps padding small; the token-weighted mean does not care about order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    accumulate = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = torch.zeros((), dtype=accumulate, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
            positions, targets = next_token_positions(batch["labels"], IGNORE_INDEX)  # (B, T), (n,) on the host
            with maybe_autocast(device, autocast_dtype):
                _, logits = forward_logits_at(model, positions, input_ids=to_device(batch["input_ids"], device), attention_mask=to_device(batch["attention_mask"], device), use_cache=False)  # (n, V)
            loss_sum += F.cross_entropy(logits.float(), to_device(targets, device), reduction="sum").to(accumulate)
            tokens += targets.numel()
    n = int(tokens.item())
    loss = loss_sum.item() / n if n else float("nan")
    return {"eval_loss": float(loss), "eval_tokens": n}


def records_loss(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict],
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    batch_size: int = 8,
) -> dict[str, float | int | None]:
    """The held-out loss of data rows (`mola.data.read_records`), as a training run's
    evaluation computes it on its validation rows: tokenized as training tokenized them
    (``cutoff_len``, ``train_on_inputs``: the run's own, to compare with its ``eval_loss``),
    then `evaluate_loss`. Returns ``{"loss", "loss_tokens"}``; the loss is None (not NaN: it
    goes into JSON) when no token is labelled."""
    examples = load_training_data(records, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    measured = evaluate_loss(model, examples, pad_token_id(tokenizer), batch_size=batch_size)
    tokens = measured["eval_tokens"]
    return {"loss": measured["eval_loss"] if tokens else None, "loss_tokens": tokens}


# ---- multiple choice by likelihood -----------------------------------------------------------


def _check_choice_items(items: Sequence[dict]) -> None:
    for i, item in enumerate(items):
        options = item.get("options")
        if not isinstance(item.get("prompt"), str):
            raise ValueError(f"item {i}: 'prompt' must be a string")
        if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"item {i}: 'options' must be a non-empty list of strings")
        answer = item.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise ValueError(f"item {i}: 'answer' must be an index into options (0..{len(options) - 1}), got {answer!r}")


def _option_scores(model: nn.Module, sequences: list[tuple[list[int], int, int]], pad_id: int, batch_size: int, normalize: bool) -> list[float]:
    """Log-likelihood of each option given its prompt, for ``(ids, prompt_len, option_len)``
    sequences. Scores stay on the device until the end: one host sync in all."""
    device = model_device(model)
    scores = torch.zeros(len(sequences), dtype=torch.float32, device=device)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate([{"input_ids": sequences[i][0]} for i in index], pad_id)
        ids = batch["input_ids"]  # (B, T), on the host
        prompt_len = torch.tensor([sequences[i][1] for i in index])  # (B,)
        option_len = torch.tensor([sequences[i][2] for i in index])  # (B,)
        # Option token j sits at prompt_len + j and is predicted at the position one before: the
        # positions prompt_len - 1 .. prompt_len + option_len - 2 of each row. Found on the host.
        steps = torch.arange(ids.shape[1])[None, :]  # (1, T)
        positions = (steps >= prompt_len[:, None] - 1) & (steps < (prompt_len + option_len)[:, None] - 1)  # (B, T)
        targets = ids[:, 1:][positions[:, :-1]]  # (n,): the option tokens, in the order of the logits
        rows = torch.arange(len(index))[:, None].expand_as(positions)[positions]  # (n,): each one's sequence
        _, logits = forward_logits_at(model, positions, input_ids=to_device(ids, device), attention_mask=to_device(batch["attention_mask"], device), use_cache=False)  # (n, V)
        logp = logits.float().log_softmax(-1).gather(-1, to_device(targets, device)[:, None]).squeeze(-1)  # (n,)
        total = torch.zeros(len(index), device=device).index_add_(0, to_device(rows, device), logp)  # (B,)
        if normalize:
            total = total / to_device(option_len, device).clamp(min=1)
        scores.index_copy_(0, to_device(torch.tensor(index), device), total)
    return scores.cpu().tolist()


def multiple_choice_accuracy(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[dict],
    batch_size: int = 8,
    normalize: bool = False,
) -> dict[str, Any]:
    """Pick, for each ``{"prompt", "options", "answer"}`` item, the option with the highest
    log-probability given the prompt (summed over the option's tokens, or their mean with
    ``normalize``), and compare with ``answer`` (an index).

    The prompt and each option are tokenized separately and concatenated, as
    `mola.data.load_training_data` does, so an option is scored on the very tokens the model was
    trained to produce. ``batch_size`` counts (prompt, option) sequences.
    Returns ``{"accuracy", "n", "correct", "predictions" (indices), "scores" (per option)}``.
    """
    _check_choice_items(items)
    if not items:
        return {"accuracy": float("nan"), "n": 0, "correct": 0, "predictions": [], "scores": []}
    prompts = tokenizer([it["prompt"] for it in items], add_special_tokens=True)["input_ids"]
    flat = [option for it in items for option in it["options"]]
    options = tokenizer(flat, add_special_tokens=False)["input_ids"]
    sequences, owners = [], []
    for i, it in enumerate(items):
        if not prompts[i]:
            raise ValueError(f"item {i}: the prompt is empty after tokenization; nothing to condition on")
        for k in range(len(it["options"])):
            option = list(options[len(sequences)])
            sequences.append((list(prompts[i]) + option, len(prompts[i]), len(option)))
            owners.append((i, k))
    lengths = ((f"item {i}: its prompt with option {k}", len(seq[0])) for seq, (i, k) in zip(sequences, owners))
    _check_positions(model, lengths, "shorten the prompt")
    with eval_mode(model), torch.no_grad():
        flat_scores = _option_scores(model, sequences, pad_token_id(tokenizer), batch_size, normalize)
    per_item: list[list[float]] = [[] for _ in items]
    for (owner, _), score in zip(owners, flat_scores):
        per_item[owner].append(score)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in per_item]  # ties: first option
    correct = sum(p == it["answer"] for p, it in zip(predictions, items))
    return {"accuracy": correct / len(items), "n": len(items), "correct": correct, "predictions": predictions, "scores": per_item}


# ---- generation ------------------------------------------------------------------------------


def extract_answer(text: str) -> str | None:
    """The X of the first "the answer is X" in ``text`` (case-insensitive; "(B)", "B.", "-3",
    "3.5" and "answer4" accepted), or None. The first match counts: models often repeat themselves."""
    match = ANSWER_PATTERN.search(text)
    return match.group(1) if match else None


def answers_match(predicted: str | None, expected: str) -> bool:
    """Letters compare exactly (a lowercase "a" is usually the article); words ignore case."""
    if predicted is None:
        return False
    expected = str(expected).strip()
    if len(expected) == 1:
        return predicted == expected
    return predicted.lower() == expected.lower()


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), each (B, T), padded on the left so that every row's next
    token is generated at the same position."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids, mask


def _generation_batches(prompt_lengths: list[int], budgets: list[int], batch_size: int, positions: int | None) -> Iterator[list[int]]:
    """Row indices in batches of at most ``batch_size``, shortest prompts first. A batch generates
    its largest budget for every row, so a row joins a batch only while the batch's longest
    prompt plus that budget stays within the model's positions (a row alone always fits: its
    own prompt plus budget was checked)."""
    batch: list[int] = []
    for i in sorted(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i]):
        widest = max([prompt_lengths[i]] + [prompt_lengths[j] for j in batch])
        new = max([budgets[i]] + [budgets[j] for j in batch])
        if batch and (len(batch) == batch_size or (positions is not None and widest + new > positions)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continuations (KV cache on) of token-id ``prompts``, row i at most ``max_new_tokens[i]``
    tokens, ending before its EOS: greedy, or with ``temperature`` > 0 sampled (nucleus
    sampling below ``top_p`` < 1; seed torch's generator for repeatable samples).
    ``on_progress(done, total)`` is called after each batch with the rows done so far.

    Prompts are padded on the left by hand (not through ``tokenizer.padding_side``, so a
    tokenizer shared with a training loop is never modified). Raises ``ValueError`` for a row
    whose prompt plus budget is longer than the model's positions.
    """
    if not prompts:
        return []
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    # Sampling settings reach generate() only when sampling: greedy decoding with a temperature
    # set makes transformers warn on every call.
    decoding: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        decoding = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    lengths = [len(p) for p in prompts]
    _check_positions(
        model,
        ((f"prompt {i} with max_new_tokens={budget}", length + budget) for i, (length, budget) in enumerate(zip(lengths, max_new_tokens))),
        "shorten the prompt or lower max_new_tokens",
    )
    device = model_device(model)
    continuations: list[list[int]] = [[] for _ in prompts]
    done = 0
    with eval_mode(model), torch.no_grad():
        for index in _generation_batches(lengths, list(max_new_tokens), batch_size, max_positions(model)):
            ids, mask = _left_pad([list(prompts[i]) for i in index], pad_id)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(max_new_tokens[i] for i in index),
                num_beams=1,
                **decoding,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            sequences = getattr(out, "sequences", out)  # (B, T + new)
            for i, row in zip(index, sequences[:, ids.shape[1] :].tolist()):
                row = row[: max_new_tokens[i]]
                continuations[i] = row[: row.index(eos_id)] if eos_id in row else row
            done += len(index)
            if on_progress is not None:
                on_progress(done, len(prompts))
    return continuations


def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
    """Greedy continuations of text ``prompts`` (see `generate_ids`), decoded without special tokens."""
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    new = generate_ids(model, encoded, [max_new_tokens] * len(encoded), pad_token_id(tokenizer), tokenizer.eos_token_id, batch_size)
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def completion_match(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generate greedily from each ``(prompt_ids, completion_ids)`` pair's prompt (as
    `mola.data.encode_pairs` gives them), as many tokens as its reference completion has, and
    compare the texts.

    Returns ``{"n", "exact_match" (the share of generations equal to their reference, whitespace
    runs counted as one space), "answers_expected" (references that say "the answer is X"),
    "answer_accuracy" (the share of those whose generation gives the same answer, see
    `answers_match`; None when no reference says one), "generations", "references"}``.
    """
    eos_id = tokenizer.eos_token_id
    # A reference ends with the EOS that training appends: the generation stops there too.
    references = [list(c[:-1]) if c and c[-1] == eos_id else list(c) for _, c in pairs]
    budgets = [max(1, len(r)) for r in references]
    new = generate_ids(model, [p for p, _ in pairs], budgets, pad_token_id(tokenizer), eos_id, batch_size)
    generations = tokenizer.batch_decode(new, skip_special_tokens=True) if new else []
    reference_texts = tokenizer.batch_decode(references, skip_special_tokens=True) if references else []
    return {**score_generations(generations, reference_texts), "generations": generations, "references": reference_texts}


def score_generations(generations: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """``{"n", "exact_match", "answers_expected", "answer_accuracy"}`` of generated texts
    against their references, as `completion_match` scores them."""
    exact = sum(_normalized(g) == _normalized(r) for g, r in zip(generations, references))
    expected = [(extract_answer(r), g) for r, g in zip(references, generations)]
    expected = [(answer, g) for answer, g in expected if answer is not None]
    correct = sum(answers_match(extract_answer(g), answer) for answer, g in expected)
    return {
        "n": len(references),
        "exact_match": exact / len(references) if references else float("nan"),
        "answers_expected": len(expected),
        "answer_accuracy": correct / len(expected) if expected else None,
    }


def generation_accuracy(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[dict],
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generate greedily for each ``{"prompt", "answer"}`` item, extract "the answer is X" and
    count exact matches (see `answers_match`).

    Returns ``{"accuracy", "n", "correct", "failed" (no answer found), "predictions"
    (extracted answers or None), "generations" (raw texts)}``.
    """
    for i, item in enumerate(items):
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("answer"), str):
            raise ValueError(f"item {i}: needs a string 'prompt' and a string 'answer'")
    generations = generate_texts(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size)
    predictions = [extract_answer(text) for text in generations]
    correct = sum(answers_match(p, it["answer"]) for p, it in zip(predictions, items))
    failed = sum(p is None for p in predictions)
    if failed:
        logger.info("generation_accuracy: no answer found in %d of %d generations", failed, len(items))
    accuracy = correct / len(items) if items else float("nan")
    return {"accuracy": accuracy, "n": len(items), "correct": correct, "failed": failed, "predictions": predictions, "generations": generations}


class CompletionScorer:
    """``train(..., extra_eval=CompletionScorer(rows, tokenizer))``: at each evaluation, generate
    the completions of ``rows`` (`mola.data.generation_rows`) and score them with
    `completion_match`: ``eval_exact_match`` and ``eval_generated`` (the rows scored), with
    ``eval_answer_accuracy`` and ``eval_answers_expected`` where references say "the answer is
    X". ``samples`` keeps the latest evaluation's first generations beside their references."""

    def __init__(self, rows: Sequence[Any], tokenizer: Any, batch_size: int = 8, keep_samples: int = 3) -> None:
        self.rows, self.tokenizer, self.batch_size, self.keep_samples = list(rows), tokenizer, batch_size, keep_samples
        self.samples: list[dict[str, str]] = []

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        pairs = [(row.prompt_ids, row.completion_ids) for row in self.rows]
        scored = completion_match(model, self.tokenizer, pairs, batch_size=self.batch_size)
        self.samples = [
            {"prompt": row.prompt, "reference": reference, "generated": generated}
            for row, reference, generated in zip(self.rows, scored["references"], scored["generations"])
        ][: self.keep_samples]
        metrics = {"eval_exact_match": scored["exact_match"], "eval_generated": scored["n"]}
        if scored["answer_accuracy"] is not None:
            metrics["eval_answer_accuracy"] = scored["answer_accuracy"]
            metrics["eval_answers_expected"] = scored["answers_expected"]
        return metrics
