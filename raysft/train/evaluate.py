"""Eval loss on the held-out rows and the eval prompts' answers, on every rank together, and when evals and
checkpoints fall due."""

from __future__ import annotations

import math

from raysft import capabilities
from raysft.data.tokenize import IGNORE_INDEX

MAX_LOG_PPL = 50.0  # perplexity is reported as exp(min(loss, this)): an untrained model's loss would overflow it


def due(step: int, total_steps: int, every: int) -> bool:
    """Checkpoints and evals: every `every` steps (0 = never) and at the last step.

    >>> [s for s in range(1, 8) if due(s, 7, 3)]
    [3, 6, 7]
    """
    return step == total_steps or bool(every and step % every == 0)


def eval_batches(num_rows: int, rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's eval micro-batches: rows dealt round-robin; every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), a rank short of rows repeating row 0 with weight 0 (id -1).

    >>> eval_batches(5, rank=1, world=2, micro_batch_size=2)
    [[1, 3], [-1]]
    """
    mine = list(range(rank, num_rows, world))
    per_rank = -(-num_rows // world)
    mine += [-1] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def evaluate(model, eval_rows, rank: int, world: int, micro_batch_size: int, pad_id: int, device,
             flat: bool = False) -> dict:
    """Eval loss (mean over every trained token of the eval rows, all ranks) and perplexity.

    `model`: the model or the engine wrapping it, with `raysft.loss` attached. The caller puts it in eval mode.
    """
    import torch
    import torch.distributed as dist

    from raysft.loss import loss_sum
    from raysft.modeling import collate, flatten

    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for micro in eval_batches(len(eval_rows), rank, world, micro_batch_size):
            batch = collate(eval_rows.get([max(i, 0) for i in micro]), pad_id, device)
            keep = torch.tensor([i >= 0 for i in micro], device=device)
            batch["labels"][~keep] = IGNORE_INDEX  # filler rows count for nothing
            if flat:
                batch = flatten(batch)
            sums[0] += loss_sum(model, batch).double()
            sums[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, MAX_LOG_PPL)), "eval_tokens": int(sums[1].item())}


def eval_due(w, step: int, total_steps: int) -> bool:
    """Whether step `step` evaluates: there is eval data or eval prompts, and `train.eval_every_steps` says so."""
    return (w.eval_rows is not None or bool(w.cfg.train.eval_prompts)) and due(step, total_steps,
                                                                                w.cfg.train.eval_every_steps)


def run_evals(engine, generator, w, step: int, metrics: dict, step_log, device) -> None:
    """On every rank: the eval loss into `metrics`, and the eval prompts' answers to `step_log` (rank 0 writes).
    `engine`: what computes the loss (the DeepSpeed engine); `generator`: the model whose `generate` answers."""
    from raysft.train.samples import answer_prompts

    t = w.cfg.train
    engine.eval()
    if w.eval_rows is not None:
        metrics.update(evaluate(engine, w.eval_rows, w.rank, w.world, t.micro_batch_size, w.tokenizer.pad_token_id,
                                device, w.flat))
    if t.eval_prompts:
        answers = answer_prompts(generator, w.tokenizer, t.eval_prompts, w.cfg.data.system_message,
                                 t.eval_max_new_tokens, capabilities.of(t.backend).params_sharded(t.zero_stage), device,
                                 w.cfg.data.chat_template_kwargs)
        step_log.samples(step, list(zip(t.eval_prompts, answers)))
    engine.train()
