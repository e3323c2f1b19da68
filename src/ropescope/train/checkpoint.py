"""Resumable checkpoints of the training loop, written whole or not at all.

Two formats, one per way a recipe runs the loop. `ropescope train` runs it through accelerate, whose `save_state`
writes every process's part (its RNG state, its FSDP shard) into one folder per step: `save_state_folder`,
`newest_state_folder`, with `LoopState` as the step it saves. `ropescope pretrain` is one plain torch process whose
whole state, with the generator its windows are drawn from, is one file: `save_file`, `load_file`.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from ropescope.io.results import atomic_path


class LoopState:
    """The loop position, saved with every checkpoint of accelerate: the data position is a function of `step`."""

    def __init__(self):
        self.step = 0  # optimizer steps finished

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def save_state_folder(accelerator, checkpoints: Path, step: int, keep: int) -> None:
    """Save model, optimizer, RNG and the registered `LoopState` for `step` into `checkpoints/step-NNNNNNNN`,
    atomically (a temporary folder, then a rename); keep the newest `keep`."""
    folder = checkpoints / f"step-{step:08d}"
    with ExitStack() as stack:
        # The main process picks the unique temporary folder; every process writes its part there.
        temporary = [stack.enter_context(atomic_path(folder)) if accelerator.is_main_process else None]
        temporary = broadcast_object_list(temporary)[0]
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()  # every process has written its part (its RNG state, its FSDP shard)
    if accelerator.is_main_process:
        for old in sorted(checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_state_folder(accelerator, folder: Path) -> None:
    """Restore what `save_state_folder` saved in `folder`. A folder of an earlier version, which registered its
    LambdaLR before the loop state (custom_checkpoint_0 and _1), is read through a view that leaves the scheduler
    out: the rate is now a function of the step, and the scheduler's pickle names modules that have moved."""
    if not (folder / "custom_checkpoint_1.pkl").is_file():
        accelerator.load_state(str(folder))
        return
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".earlier-") as view:
        for item in folder.iterdir():
            if not item.name.startswith("custom_checkpoint_"):
                (Path(view) / item.name).symlink_to(item.resolve())
        (Path(view) / "custom_checkpoint_0.pkl").symlink_to((folder / "custom_checkpoint_1.pkl").resolve())
        accelerator.load_state(view)


def newest_state_folder(checkpoints: Path) -> Path | None:
    """The newest checkpoint folder of `save_state_folder`, or None."""
    folders = sorted(checkpoints.glob("step-*")) if checkpoints.exists() else []
    return folders[-1] if folders else None


def save_file(path: Path, state: dict) -> None:
    """`torch.save(state)` to `path` atomically: a temporary file beside it, then a rename."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_file(path: Path) -> dict | None:
    """The state `save_file` wrote to `path`, or None when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)
