"""The one training loop of `ropescope train` and `ropescope pretrain`: optimizer steps, read top to bottom.

A recipe (train/continual.py, train/pretrain.py) sets up the model, its optimizer and its data, and hands the loop
what differs between them as `Steps`: where a micro-batch comes from (continual pretraining: a pure function of the
step, whatever the process count; pretraining: windows drawn from one seeded generator), the learning rate of a
step, what becomes of each step's `StepRecord` (metrics.csv; printed loss lines) and how a checkpoint is saved
(accelerate's folders; one torch file). The loop does the rest the same way for both: the learning rate set on
every parameter group, gradient accumulation, clipping, the step, the loss reduced over processes, the wall-clock
rate, the progress bar and the checkpoint cadence. Pretraining from scratch is this loop over a model built from a
config instead of a pretrained checkpoint.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from ropescope.train.batch import batch_arithmetic
from ropescope.train.metrics import StepRecord


class PlainTorch:
    """The calls the loop makes of an `accelerate.Accelerator`, for one plain torch process on the CPU: what
    `ropescope pretrain` runs on, so that it leaves accelerate's process-wide state alone (a `ropescope train` in
    the same process may then choose its own mixed precision)."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    is_local_main_process = True
    device = torch.device("cpu")

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor  # one process: its mean is the global one

    def no_sync(self, model):
        return nullcontext()


@dataclass
class Steps:
    """What a recipe hands `run_steps`. `batch_at(step, micro_step)` returns (input_ids, is_answer or None) of this
    process's micro-batch, [batch_size, length]; `lr_at(step)` the learning rate of a step (0-based);
    `after_step(record)` takes each step's `StepRecord`; `save_checkpoint(step)` saves the state after `step` steps,
    every `checkpoint_every` steps (0 = never) but after the last."""

    steps: int
    batch_size: int  # blocks per process per micro-step
    grad_accum: int
    length: int
    max_grad_norm: float  # 0 = no clipping
    checkpoint_every: int
    batch_at: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]
    lr_at: Callable[[int], float]
    after_step: Callable[[StepRecord], None]
    save_checkpoint: Callable[[int], None]
    label: str  # the progress bar's description
    progress: bool | None  # None: a bar only on a terminal


def run_steps(accelerator, model, optimizer, steps: Steps, first_step: int) -> None:
    """Optimizer steps `first_step`..`steps.steps` of `model`, whose forward(input_ids, is_answer) returns the loss
    (a `ropescope.eval.nll.CausalLMLoss`), on an `accelerate.Accelerator` or `PlainTorch`."""
    tokens_per_step = steps.batch_size * accelerator.num_processes * steps.grad_accum * steps.length
    show = accelerator.is_local_main_process and steps.progress is not False
    bar = tqdm(total=steps.steps, initial=first_step, desc=steps.label, unit="step",
               disable=None if (show and steps.progress is None) else not show)
    if not bar.disable:
        bar.write(batch_arithmetic(steps.batch_size, accelerator.num_processes, steps.grad_accum, steps.length),
                  file=sys.stderr)
    last_step_end = time.perf_counter()
    try:
        for step in range(first_step, steps.steps):
            lr = steps.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro_step in range(steps.grad_accum):
                input_ids, is_answer = steps.batch_at(step, micro_step)
                input_ids = input_ids.to(accelerator.device, non_blocking=True)
                is_answer = None if is_answer is None else is_answer.to(accelerator.device)
                last = micro_step == steps.grad_accum - 1
                # Gradients are all-reduced only on the last micro-step: the others accumulate locally.
                with nullcontext() if last else accelerator.no_sync(model):
                    loss = model(input_ids, is_answer)
                    accelerator.backward(loss / steps.grad_accum)
                loss_sum += loss.detach()
            if steps.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), steps.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Every block has the same token count, so the mean of the per-process means is the global mean.
            step_loss = accelerator.reduce(loss_sum / steps.grad_accum, reduction="mean").item()
            # Wall clock from one step's end to the next: the bookkeeping (metrics, bar, checkpoints) counts too.
            now = time.perf_counter()
            record = StepRecord(step + 1, step_loss, lr, tokens_per_step / (now - last_step_end))
            last_step_end = now
            steps.after_step(record)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record.tokens_per_s:.0f}")
            bar.update(1)
            if steps.checkpoint_every and record.step % steps.checkpoint_every == 0 and record.step < steps.steps:
                steps.save_checkpoint(record.step)
    finally:
        bar.close()
