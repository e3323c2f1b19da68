"""Continual pretraining with a RoPE extension: the training loop of `ropescope.train.loop` over accelerate.

    ropescope train --model default --method yarn --factor 4 --length 1024 --steps 200 --out runs/yarn-1024
    accelerate launch --num_processes 8 -m ropescope train ...        # the same loop, data parallel (or FSDP)

The model gets the extension (`extend`), then trains on causal-LM loss over blocks of `length` tokens. The run
folder ends up holding a Hugging Face checkpoint (safetensors weights, a config that carries the rope
parameters, the tokenizer) that `from_pretrained` loads with the extension active, plus `metrics.csv`, `run.json`
and the resumable checkpoints under `checkpoints/`.

Data order is a pure function of (seed, step): step s trains on global batch s of a seeded shuffle of the
corpus blocks, whatever the number of processes. Each process takes its own slice of that global batch, so N
processes with 1/N of the per-process batch follow the same loss trajectory as one process, and a resumed run
needs nothing but the step to find its place in the data. With `retrieval_mix`, a share of the blocks are
replaced by synthetic passkey examples (the generator of `ropescope pretrain`), drawn per stream position from the
seed, so the same holds for them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig

from ropescope.errors import RopescopeError
from ropescope.eval.nll import CausalLMLoss
from ropescope.io.data import load_corpus, token_blocks
from ropescope.io.results import run_differences, run_identity, write_atomically
from ropescope.model.load import ModelOptions, load, load_tokenizer
from ropescope.model.patch import extend, pretrained_rope
from ropescope.model.resolve import TOKENIZER_FILES, resolve_model
from ropescope.rope import parse_spec
from ropescope.tasks.passkey import RETRIEVAL_HAYSTACKS, PasskeyPrompts
from ropescope.train.checkpoint import LoopState, load_state_folder, newest_state_folder, save_state_folder
from ropescope.train.loop import Steps, run_steps
from ropescope.train.memory import checkpointing_pays, model_shape
from ropescope.train.metrics import MetricsFile, metrics_rows
from ropescope.train.options import check_learning_rate, check_not_negative, check_positive_integers, option
from ropescope.train.schedule import SCHEDULES, lr_by_multiplier

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the attention projections, where RoPE acts
# With retrieval_mix: the share of passkey rows packed with short examples of 40-80 tokens (as in the later stages
# of the shipped model's pretraining); the other passkey rows hold one example of the training length.
RETRIEVAL_PACKED_SHARE = 0.3
RETRIEVAL_PACKED_MIN_LENGTH = 40
# The final checkpoint is written into STAGING, renamed to STAGED once whole, then its files are moved into the run
# folder with config.json last: a run folder with config.json holds the complete checkpoint, and a STAGED folder
# left by a kill is published by the rerun.
STAGING, STAGED = ".final.partial", ".final.staged"
# Fields that do not change what the run computes: a resumed run may differ in these.
_NOT_IDENTITY = {"out", "resume", "overwrite", "progress", "checkpoint_every", "keep_checkpoints", "batch_size",
                 "gradient_checkpointing"}


@dataclass
class TrainConfig:
    """One continual-pretraining run. Batch sizes count blocks of `length` tokens."""

    out: str | Path = option(help="run folder: the final checkpoint, metrics.csv, run.json, checkpoints/")
    model: str = option("default", "\"default\" (the shipped model), a local Hugging Face folder, a .gguf file, "
                                   "\"smollm2-135m\" or a Hub id")
    method: str = option("yarn", "NAME[:KEY=VALUE,...]: a RoPE method of `ropescope methods` with its parameters")
    factor: float = option(4.0, "extension factor s = target length / pretrained length, for methods that take one")
    original_max_position_embeddings: int | None = option(None, "the pretrained context length (default: the "
                                                                "model's own, before any extension it carries)")
    spec: dict | None = None  # a full RopeSpec.to_dict(); when given, replaces the three above (Python only)
    length: int = option(1024, "tokens per training block")
    steps: int = option(100, "optimizer steps")
    corpus: str | None = option(None, "a corpus path for ropescope.io.data.load_corpus (its train split is used); "
                                      "unset = the shipped corpus")
    batch_size: int = option(1, "blocks of `length` tokens per process per micro-step")
    grad_accum: int = option(1, "gradient accumulation: micro-steps per optimizer step")
    learning_rate: float = option(1e-4, "peak learning rate of AdamW")
    schedule: str = option("cosine", "learning-rate shape after the warm-up: cosine or linear decay to min_lr_ratio, "
                                     "or constant")
    warmup_steps: int = option(0, "steps of linear warm-up to the peak learning rate")
    min_lr_ratio: float = option(0.1, "where cosine and linear decay end, as a fraction of learning_rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping: the largest global gradient norm; 0 turns clipping off")
    mixed_precision: str = option("auto", "auto, no, bf16 or fp16; auto = bf16 on a GPU that supports it, else no "
                                          "(float32)")
    gradient_checkpointing: bool | None = option(None, (
        "recompute each decoder layer's activations in the backward instead of keeping them: less memory, about a "
        "third more time; unset = on where the activations a micro-step keeps would exceed the weights, gradients "
        "and optimizer state and the step would take over half the device (ropescope.train.memory.checkpointing_pays); "
        "run.json records what was used"))
    lora_rank: int = option(0, "0 = full fine-tune; > 0 trains LoRA adapters of this rank on the attention "
                               "projections (peft) and saves them merged")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA adapters' input")
    seed: int = option(0, "seed of the data order, the passkey examples and the LoRA initialisation")
    checkpoint_every: int = option(0, "steps between resumable checkpoints; 0 = none")
    keep_checkpoints: int = option(2, "how many of the newest resumable checkpoints are kept")
    resume: bool = option(False, "continue the run in `out` from its newest checkpoint")
    overwrite: bool = option(False, "replace the run in `out`")
    progress: bool | None = option(None, "a progress bar; unset = only on a terminal")
    retrieval_mix: float = option(0.0, (
        "fraction of training blocks, in [0, 1), replaced by synthetic passkey examples (the generator `ropescope "
        "pretrain` uses: one example of the training length, or short ones packed), with an extra loss on the answer "
        "tokens, so that the fine-tune keeps retrieval; 0 = plain text only"))
    retrieval_haystack: str = option("filler", (
        "the text around the key in the passkey examples of retrieval_mix: filler (the repeated sentences `ropescope "
        "pretrain` teaches) or corpus (the training block's own text, as in an evaluation with independent "
        "haystacks)"))
    retrieval_min_length: int | None = option(None, (
        "tokens of the shortest single passkey example of retrieval_mix: each one's length is drawn from here up to "
        "the training length, so the fine-tune retrieves over every distance in between, not only the longest; "
        "unset = every one is of the training length"))
    answer_loss_weight: float = option(1.0, (
        "weight of the extra loss term with retrieval_mix: the mean loss over the passkey answer tokens, added to the "
        "mean over all tokens (in the plain loss a key's digits are about one token in a hundred)"))


def validate(config: TrainConfig) -> None:
    """Check every value a user can get wrong that needs no model or data: one RopescopeError line each."""
    check_positive_integers(config, ("length", "steps", "batch_size", "grad_accum"))
    check_learning_rate(config)
    if config.schedule not in SCHEDULES:
        raise RopescopeError(f"schedule={config.schedule!r} is unknown; accepted: {', '.join(SCHEDULES)}")
    if not 0 <= config.warmup_steps <= config.steps:
        raise RopescopeError(f"warmup_steps={config.warmup_steps} is outside 0..steps ({config.steps})")
    if not 0 <= config.min_lr_ratio <= 1:
        raise RopescopeError(f"min_lr_ratio={config.min_lr_ratio} is outside 0..1")
    if config.mixed_precision not in MIXED_PRECISION:
        raise RopescopeError(
            f"mixed_precision={config.mixed_precision!r} is unknown; accepted: {', '.join(MIXED_PRECISION)}")
    check_not_negative(config, ("checkpoint_every", "lora_rank", "max_grad_norm", "weight_decay", "answer_loss_weight"))
    if config.keep_checkpoints < 1:
        raise RopescopeError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1")
    original = config.original_max_position_embeddings
    if original is not None and original <= 0:
        raise RopescopeError(f"original_max_position_embeddings={original} is not a positive integer")
    if config.retrieval_haystack not in RETRIEVAL_HAYSTACKS:
        raise RopescopeError(f"retrieval_haystack={config.retrieval_haystack!r} is unknown; accepted: "
                             f"{', '.join(RETRIEVAL_HAYSTACKS)}")
    if not 0 <= config.retrieval_mix < 1:
        raise RopescopeError(f"retrieval_mix={config.retrieval_mix} is outside [0, 1)")
    shortest = config.retrieval_min_length
    if shortest is not None and (isinstance(shortest, bool) or not isinstance(shortest, int)
                                 or not 0 < shortest <= config.length):
        raise RopescopeError(f"retrieval_min_length={shortest!r} is outside 1..length ({config.length})")
    if config.resume and config.overwrite:
        raise RopescopeError("resume and overwrite both set; pass one: resume continues the run, overwrite replaces it")


def block_slots(step: int, micro_step: int, process_index: int, config: TrainConfig, num_processes: int) -> range:
    """The positions in the endless block stream one process trains on at (step, micro_step).

    Global batch `step` is slots [step * G, (step + 1) * G), G = batch_size * num_processes * grad_accum; the
    process's slice of it depends on (micro_step, process_index) only, so the set of slots per step does not
    depend on the process count.
    """
    global_batch = config.batch_size * num_processes * config.grad_accum
    first = step * global_batch + (micro_step * num_processes + process_index) * config.batch_size
    return range(first, first + config.batch_size)


def block_indices(step: int, micro_step: int, process_index: int, num_blocks: int, config: TrainConfig,
                  num_processes: int, generator_cache: dict | None = None) -> list[int]:
    """Corpus block indices one process trains on at (step, micro_step): its `block_slots` in an endless stream
    of seeded per-epoch shuffles of the `num_blocks` blocks."""
    cache = generator_cache if generator_cache is not None else {}
    indices = []
    for slot in block_slots(step, micro_step, process_index, config, num_processes):
        epoch, position = divmod(slot, num_blocks)
        if epoch not in cache:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            cache.clear()  # one epoch's permutation at a time is enough: slots only move forward
            cache[epoch] = torch.randperm(num_blocks, generator=generator)
        indices.append(int(cache[epoch][position]))
    return indices


def _slot_generator(seed: int, slot: int) -> torch.Generator:
    """The random stream of one slot's passkey draw: a function of (seed, slot), apart from the block shuffles'."""
    return torch.Generator().manual_seed((seed << 40) + (1 << 39) + slot)


def micro_batch(blocks: torch.Tensor, slots: range, indices: list[int], config: TrainConfig,
                passkeys=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, is_answer) of one micro-batch: the corpus blocks `indices`, each replaced with probability
    `retrieval_mix` (drawn per slot, so the same whatever the process count or a resume) by passkey examples from
    `passkeys` (a `PasskeyPrompts`), as `ropescope pretrain` mixes them in: one example of `retrieval_min_length`
    to the training length, or, in a share RETRIEVAL_PACKED_SHARE of those rows, short examples packed back to back.

    blocks: LongTensor[num_blocks, length]. Returns input_ids: LongTensor[batch_size, length] and is_answer:
    bool [batch_size, length] marking the answer tokens, or None when no passkey was drawn.
    """
    input_ids = blocks[indices]
    if not config.retrieval_mix:
        return input_ids, None
    input_ids = input_ids.clone()
    is_answer = torch.zeros_like(input_ids, dtype=torch.bool)
    # Packed examples long enough to hold the whole key line: a cut one would ask for a key it does not show.
    shortest_packed = max(RETRIEVAL_PACKED_MIN_LENGTH, passkeys.whole_example_length)
    shortest_single = config.retrieval_min_length or config.length
    for row, slot in enumerate(slots):
        generator = _slot_generator(config.seed, slot)
        if float(torch.rand((), generator=generator)) >= config.retrieval_mix:
            continue
        packed = float(torch.rand((), generator=generator)) < RETRIEVAL_PACKED_SHARE
        block = input_ids[row].tolist()
        haystack = block if config.retrieval_haystack == "corpus" else None
        ids, answers = passkeys.training_row(config.length, generator, packed,
                                             shortest_packed if packed else shortest_single, haystack)
        rest = max(config.length - len(ids), 0)
        # The row is filled with corpus text; after corpus haystacks, with the block's end, which they did not use.
        ids = ids[: config.length] + (block[len(block) - rest :] if haystack else block[:rest])
        input_ids[row] = torch.tensor(ids, dtype=torch.long)
        for start, end in answers:
            is_answer[row, start:end] = True
    return input_ids, (is_answer if is_answer.any() else None)


def _identity(config: TrainConfig, global_batch: int) -> dict:
    """What makes two runs the same run: every field that changes the computation, with the global batch."""
    identity = run_identity(config, ignore=_NOT_IDENTITY, global_batch=global_batch)
    if not config.retrieval_mix:
        del identity["retrieval_mix"]  # a run without it is the same run as before the option existed
    if not config.retrieval_mix or config.retrieval_haystack == "filler":
        del identity["retrieval_haystack"]  # filler is what runs before the option used
    if not config.retrieval_mix or config.retrieval_min_length is None:
        del identity["retrieval_min_length"]  # unset: single examples of the training length, as before it
    if not config.retrieval_mix or config.answer_loss_weight == 1.0:
        del identity["answer_loss_weight"]  # unused without passkeys; 1.0 is what runs before the field used
    return identity


def _check_out(config: TrainConfig, identity: dict) -> None:
    """Refuse an output folder that holds another run (or anything else) unless told to resume or overwrite."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RopescopeError(f"out={out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    run_file = out / "run.json"
    if not run_file.exists():
        raise RopescopeError(f"out={out} holds files that are not a ropescope training run; give an empty or new folder")
    if config.overwrite:
        return
    previous = json.loads(run_file.read_text())["config"]
    differences = run_differences(previous, identity, ignore=_NOT_IDENTITY)
    if differences:
        detail = ", ".join(f"{k}={previous.get(k)!r} there vs {identity.get(k)!r} here" for k in differences[:3])
        raise RopescopeError(f"out={out} holds a different run ({detail}); pass overwrite to replace it, "
                             "or give another folder")
    if not config.resume:
        raise RopescopeError(f"out={out} already holds this run; pass resume to continue it or overwrite to start over")
    if _is_complete(out, config.steps):
        # exit code 2 like every refusal: nothing was done, and the checkpoint in `out` is the finished run's
        raise RopescopeError(f"out={out} holds this run complete ({config.steps} steps); nothing to resume "
                             "(pass overwrite to train it again)")


def _is_complete(out: Path, steps: int) -> bool:
    """The last step's metrics are written and the final checkpoint published (its config.json is moved in last)."""
    return _trained(out, steps) and not (out / STAGED).exists() and (out / "config.json").is_file() \
        and (out / "tokenizer_config.json").is_file() and any((out / name).is_file() for name in TOKENIZER_FILES)


def _trained(out: Path, steps: int) -> bool:
    """Every step's metrics are written: the training itself is over."""
    rows = metrics_rows(out / "metrics.csv", steps)
    return bool(rows) and int(rows[-1]["step"]) == steps


def _training_blocks(tokenizer, config: TrainConfig, global_batch: int) -> torch.Tensor:
    """The corpus's train split as blocks of `length` tokens, at most as many as the run consumes.

    Returns: LongTensor[num_blocks, length]. Raises RopescopeError if the corpus cannot fill one global batch.
    """
    documents = load_corpus(config.corpus, split="train")
    needed = config.steps * global_batch  # a run that outlasts the corpus goes round it again, reshuffled
    try:
        blocks = list(islice(token_blocks(tokenizer, documents, block_length=config.length), needed))
    except RopescopeError:  # not one block; the message below says what a run needs
        blocks = []
    if len(blocks) < global_batch:
        # Counted as token_blocks counts: no special tokens, one separator between documents.
        separators = (len(documents) - 1) if tokenizer.eos_token_id is not None else 0
        corpus_tokens = separators + sum(
            len(tokenizer(document, add_special_tokens=False)["input_ids"]) for document in documents)
        name = config.corpus or "the shipped corpus"
        raise RopescopeError(
            f"length={config.length}: corpus {name} (train split) holds {corpus_tokens} tokens, and one global batch "
            f"of {global_batch} blocks needs {global_batch * config.length}; lower length or batch size, "
            "or give a larger corpus")
    return torch.stack(blocks)


def _mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"


def _setup_accelerator(config: TrainConfig):
    # Launched as several processes on a machine without CUDA, accelerate would run each process alone unless
    # told it is on CPU; told, it joins them with gloo (torchrun and `accelerate launch --multi_gpu` both work).
    launched_on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=_mixed_precision(config), cpu=launched_on_cpu)


def _rope_spec(config: TrainConfig, model_path: Path):
    if config.spec is not None:
        return parse_spec(config.spec)
    # The length the model was pretrained at, even when the checkpoint already carries an extension.
    original = config.original_max_position_embeddings or pretrained_rope(AutoConfig.from_pretrained(model_path))[1]
    return parse_spec(config.method, factor=config.factor, original_max_position_embeddings=original)


def _start_run_folder(accelerator, config: TrainConfig, identity: dict, spec, num_blocks: int,
                      checkpointing: bool) -> Path | None:
    """Create (or clear, on overwrite) the run folder and write run.json; return the checkpoint to resume from."""
    out = Path(config.out)
    resume_from = newest_state_folder(out / "checkpoints") if config.resume else None
    if accelerator.is_main_process:
        if config.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        run = {"config": identity, "spec": spec.to_dict(),
               "num_processes": accelerator.num_processes, "corpus_blocks": num_blocks,
               "gradient_checkpointing": checkpointing}
        write_atomically(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return resume_from


def uses_checkpointing(config: TrainConfig, model_config, mixed_precision: str,
                       device_memory: int | None = None) -> bool:
    """The run's gradient checkpointing: as the config says, or, unset, where it pays for this model and
    micro-batch on a device of `device_memory` bytes (`ropescope.train.memory.checkpointing_pays`)."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    dtype_bytes = 4 if mixed_precision == "no" else 2
    return checkpointing_pays(model_shape(model_config), config.batch_size * config.length, dtype_bytes=dtype_bytes,
                              device_memory=device_memory)


def _device_memory(device: torch.device) -> int:
    """Bytes a training step may use: the GPU's memory, or the memory this machine has available."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().available


def _prepare_model(config: TrainConfig, model, checkpointing: bool):
    """Training mode, activation checkpointing and LoRA adapters as the config asks."""
    model.train()
    model.config.use_cache = False  # no KV cache while training; put back before saving
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_rank:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model


def _setup_optimizer(accelerator, config: TrainConfig, model, resume_from: Path | None):
    """(model, optimizer, state), prepared by accelerate and restored from `resume_from` if given."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    state = LoopState()
    accelerator.register_for_checkpointing(state)
    if resume_from is not None:
        load_state_folder(accelerator, resume_from)
    return model, optimizer, state


def _train_loop(accelerator, config: TrainConfig, model, optimizer, state: LoopState, blocks: torch.Tensor,
                passkeys, label: str) -> None:
    """`run_steps` from `state.step` to `config.steps` with this recipe's data (`micro_batch`, a pure function of
    the step), learning rate (`lr_by_multiplier`), metrics.csv and accelerate checkpoints."""
    out = Path(config.out)
    num_processes = accelerator.num_processes
    metrics = MetricsFile(out / "metrics.csv", state.step) if accelerator.is_main_process else None
    permutations: dict = {}

    def batch_at(step: int, micro_step: int):
        slots = block_slots(step, micro_step, accelerator.process_index, config, num_processes)
        indices = block_indices(step, micro_step, accelerator.process_index, len(blocks), config, num_processes,
                                permutations)
        return micro_batch(blocks, slots, indices, config, passkeys)

    def save_checkpoint(step: int) -> None:
        state.step = step
        save_state_folder(accelerator, out / "checkpoints", step, config.keep_checkpoints)

    steps = Steps(steps=config.steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
                  length=config.length, max_grad_norm=config.max_grad_norm, checkpoint_every=config.checkpoint_every,
                  batch_at=batch_at, lr_at=lambda step: lr_by_multiplier(step, config),
                  after_step=metrics.write if metrics else lambda record: None, save_checkpoint=save_checkpoint,
                  label=f"train {label} @ {config.length}", progress=config.progress)
    try:
        run_steps(accelerator, model, optimizer, steps, state.step)
    finally:
        if metrics is not None:
            metrics.close()


def train(config: TrainConfig) -> Path:
    """Fine-tune `config.model` with the extension `config.method` at `config.length`; return the run folder.

    Runs as it is on one process, and under `accelerate launch` on many (DDP or FSDP, as accelerate is set up).
    """
    validate(config)
    accelerator = _setup_accelerator(config)
    global_batch = config.batch_size * accelerator.num_processes * config.grad_accum
    identity = _identity(config, global_batch)
    _check_out(config, identity)
    out = Path(config.out)
    if config.resume and (out / STAGED).is_dir() and _trained(out, config.steps):
        # Killed while publishing its final checkpoint, which was whole: finish that, nothing to train.
        if accelerator.is_main_process:
            _publish_final(out)
        accelerator.wait_for_everyone()
        return out

    # The extension, the data, the model: all checked before the first file is written; the model last, so
    # a bad factor or a corpus too short for the length does not wait for a large model to load.
    model_path = resolve_model(config.model).path
    spec = _rope_spec(config, model_path)
    blocks = _training_blocks(load_tokenizer(model_path), config, global_batch)
    set_seed(config.seed)
    # Float32 on the CPU: accelerate places the model and casts for mixed precision itself.
    loaded = load(model_path, options=ModelOptions(device="cpu", dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    extend(model, spec)
    accelerator.wait_for_everyone()  # every process has looked at `out` before the main one changes it

    # FSDP's own activation checkpointing (its accelerate config) wraps the layers itself: transformers' stays off.
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    by_fsdp = bool(fsdp is not None and fsdp.activation_checkpointing)
    checkpointing = by_fsdp or uses_checkpointing(config, model.config, accelerator.mixed_precision,
                                                  _device_memory(accelerator.device))
    resume_from = _start_run_folder(accelerator, config, identity, spec, len(blocks), checkpointing)
    # The loss goes through the wrapper's forward: the output head runs over chunks of positions, never holding
    # [tokens x vocabulary] logits (ropescope.eval.nll.causal_lm_loss).
    model = CausalLMLoss(_prepare_model(config, model, checkpointing and not by_fsdp), config.answer_loss_weight)
    model, optimizer, state = _setup_optimizer(accelerator, config, model, resume_from)
    passkeys = PasskeyPrompts(tokenizer) if config.retrieval_mix else None
    _train_loop(accelerator, config, model, optimizer, state, blocks, passkeys, spec.label())
    _save_final(accelerator, model, tokenizer, Path(config.out), lora=bool(config.lora_rank))
    return Path(config.out)


def _save_final(accelerator, model, tokenizer, out: Path, lora: bool) -> None:
    """Write the Hugging Face checkpoint: safetensors weights, config with the rope parameters, tokenizer."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model).lm
    if lora:
        # Merged, the checkpoint is a plain model again: from_pretrained needs neither peft nor ropescope.
        unwrapped = unwrapped.merge_and_unload()
        state_dict = None
    else:
        state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards on the main process
        if state_dict is not None:  # the loss wrapper's keys, as the model's own
            state_dict = {key.removeprefix("lm."): value for key, value in state_dict.items()}
    if accelerator.is_main_process:
        if unwrapped.is_activation_checkpointing:
            unwrapped.activation_checkpointing_disable()
        unwrapped.config.use_cache = True
        shutil.rmtree(out / STAGING, ignore_errors=True)  # a save that died: its files are of no use
        unwrapped.save_pretrained(out / STAGING, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out / STAGING)
        os.replace(out / STAGING, out / STAGED)
        _publish_final(out)
    accelerator.wait_for_everyone()


def _publish_final(out: Path) -> None:
    """Move the whole staged checkpoint's files into the run folder, config.json last (what marks it complete)."""
    staged = out / STAGED
    for name in sorted((path.name for path in staged.iterdir()), key=lambda name: name == "config.json"):
        os.replace(staged / name, out / name)
    staged.rmdir()
