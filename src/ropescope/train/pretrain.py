"""Pretrain the shipped default: a small LlamaForCausalLM with original RoPE at a short context.

Reads top to bottom: train a byte-level BPE tokenizer on the train split, tokenize the split once, then the
training loop of `ropescope train` (`ropescope.train.loop`), in plain torch on one process, over random windows of
`length` tokens, of which a share are synthetic passkey examples (format in `ropescope.tasks.passkey`) so
the model learns to retrieve a key from anywhere in its context. Seeded and deterministic on a given machine;
checkpoints every `checkpoint_every` steps and resumes from the last one; the output folder (HF config,
safetensors weights, tokenizer) appears atomically at the end.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ropescope.errors import RopescopeError
from ropescope.eval.nll import CausalLMLoss
from ropescope.io.data import load_corpus
from ropescope.io.results import atomic_path, run_differences
from ropescope.model.load import load_tokenizer
from ropescope.model.resolve import resolve_model
from ropescope.tasks.passkey import PasskeyPrompts
from ropescope.train.checkpoint import load_file, save_file
from ropescope.train.batch import batch_arithmetic
from ropescope.train.loop import PlainTorch, Steps, run_steps
from ropescope.train.metrics import StepRecord
from ropescope.train.options import check_learning_rate, check_not_negative, check_positive_integers, option
from ropescope.train.schedule import lr_at

END_OF_TEXT = "<|endoftext|>"
CHECKPOINT_FILE = "checkpoint.pt"
# Fields that do not change the model: a checkpoint resumes a run that differs only in these.
NOT_IDENTITY = ("out", "checkpoint_dir", "checkpoint_every", "log_every", "threads")
# Names the fields had before they took `ropescope train`'s: a checkpoint saved under them still resumes.
OLD_NAMES = {"output": "out", "context_length": "length", "min_learning_rate_ratio": "min_lr_ratio",
             "passkey_share": "retrieval_mix"}


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run; the defaults are stage 1 of the shipped model (MODEL_CARD.md).
    Fields that `ropescope train` also has carry its names and meanings."""

    out: str = option(help="output folder: the Hugging Face model (config, safetensors weights, tokenizer) and "
                           "training_summary.json, written whole at the end")
    corpus: str | None = option(None, "a corpus path for ropescope.io.data.load_corpus (its train split is used); "
                                      "unset = the shipped corpus")
    seed: int = option(0, "seed of the initial weights, the windows drawn and the passkey examples")
    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(8, "windows of `length` tokens per optimizer step")
    length: int = option(256, "tokens per training window: the pretrained length, the model's "
                              "max_position_embeddings")
    learning_rate: float = option(3e-3, "peak learning rate of AdamW")
    warmup_steps: int = option(50, "steps of linear warm-up to the peak learning rate")
    min_lr_ratio: float = option(0.1, "where the cosine decay ends, as a fraction of learning_rate")
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices (none on norms and biases)")
    retrieval_mix: float = option(0.3, "fraction of the windows of a batch, in [0, 1], that are synthetic passkey "
                                       "examples, with an extra loss on their answer tokens (train's retrieval_mix, "
                                       "which does not accept 1)")
    # In the plain language-model loss a key's 5 digits are ~1% of the batch's tokens and retrieval is learned too late.
    answer_loss_weight: float = option(1.0, "weight of the extra loss term: the mean loss over the passkey answer "
                                            "tokens, added to the mean over all tokens")
    # The retrieval circuit forms on short distances first, then carries over to the whole context.
    passkey_packed_share: float = option(0.0, "share of the passkey windows that pack several short examples "
                                              "(passkey_min_length to twice that many tokens each)")
    passkey_min_length: int = option(48, "tokens of the shortest packed passkey example")
    vocab_size: int = option(4096, "size of the byte-level BPE vocabulary trained on the corpus")
    hidden_size: int = option(128, "width of the model (the shipped model: 4 heads of 32 dimensions, so RoPE "
                                   "rotates 16 pairs per head)")
    num_layers: int = option(4, "decoder layers")
    num_heads: int = option(4, "attention heads per layer (head size hidden_size / num_heads must be even: RoPE "
                               "rotates pairs)")
    intermediate_size: int = option(384, "width of the SwiGLU MLP (3 x hidden_size in the shipped model)")
    rope_theta: float = option(10000.0, "RoPE base: pair i turns by base^(-2i/d) per token (Su et al. 2021; "
                                        "10,000 as in Llama 2)")
    threads: int = option(2, "torch threads")
    checkpoint_every: int = option(100, "steps between the checkpoints a rerun resumes from")
    log_every: int = option(25, "steps between printed loss lines")
    checkpoint_dir: str | None = option(None, "folder of the resumable checkpoint; unset = <out>.checkpoint beside "
                                              "the output folder")
    init_from: str | None = option(None, "continue from a saved model folder: its tokenizer and architecture (the "
                                         "size settings are then unused)")
    schedule: ClassVar[str] = "cosine"  # the learning rate decays by cosine after the warm-up (not a setting)

    @property
    def checkpoint_path(self) -> Path:
        folder = Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(self.out).rstrip("/") + ".checkpoint")
        return folder


def validate(config: PretrainConfig) -> None:
    """Check every value a user can get wrong before anything is read or written: one RopescopeError line each."""
    check_positive_integers(config, ("steps", "batch_size", "length", "vocab_size", "hidden_size", "num_layers",
                                     "num_heads", "intermediate_size", "threads", "checkpoint_every", "log_every"))
    check_not_negative(config, ("answer_loss_weight",))
    for name in ("retrieval_mix", "passkey_packed_share"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise RopescopeError(f"{name}={getattr(config, name)} is outside 0..1")
    check_learning_rate(config)
    if config.hidden_size % config.num_heads:
        raise RopescopeError(f"hidden_size={config.hidden_size} is not divisible by num_heads={config.num_heads}")
    if (config.hidden_size // config.num_heads) % 2:
        raise RopescopeError(f"head_dim={config.hidden_size // config.num_heads} must be even for RoPE")
    if config.vocab_size < 300:
        raise RopescopeError(f"vocab_size={config.vocab_size} is below 300 (256 bytes + merges + special)")
    if not config.passkey_min_length <= config.length:
        raise RopescopeError(f"passkey_min_length={config.passkey_min_length} exceeds length={config.length}")
    if config.init_from is not None:
        if not (Path(config.init_from) / "config.json").is_file():
            raise RopescopeError(f"init_from={config.init_from!r} is not a saved model folder (no config.json in it)")
        resolve_model(config.init_from)  # a damaged folder is refused here, before anything is written


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (HF fast tokenizer) trained on `documents`; every digit is its own token.

    Digits are split before BPE so a number is read and written digit by digit: a passkey is copied one digit
    per step instead of depending on which digit groups happened to be merged.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1_000_000,  # RoPE has no hard limit; the pretrained length lives in the model config
    )


def build_model(config: PretrainConfig, tokenizer):
    """A freshly initialised LlamaForCausalLM (original RoPE, tied embeddings, sdpa attention)."""
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.length,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(model_config)


def _batch(tokens: torch.Tensor, passkeys: PasskeyPrompts, config: PretrainConfig, generator: torch.Generator):
    """(input_ids, is_answer), both [batch_size, length]: random windows of the train tokens, with rows
    replaced by a passkey example (then eos and corpus text to fill the row) at rate `retrieval_mix`;
    is_answer marks the tokens of each example's answer (" " and the key's digits)."""
    length = config.length
    starts = torch.randint(0, tokens.numel() - length, (config.batch_size,), generator=generator)
    rows = torch.stack([tokens[start : start + length] for start in starts.tolist()]).long()
    is_passkey = torch.rand(config.batch_size, generator=generator) < config.retrieval_mix
    is_answer = torch.zeros_like(rows, dtype=torch.bool)
    is_packed = torch.rand(config.batch_size, generator=generator) < config.passkey_packed_share
    for row in torch.nonzero(is_passkey).flatten().tolist():
        packed, answers = passkeys.training_row(length, generator, bool(is_packed[row]), config.passkey_min_length)
        for start, end in answers:
            is_answer[row, start:end] = True
        # Fill the rest of the row with corpus text (after the end-of-text token that closes the last example).
        packed = packed[:length] + rows[row, : max(length - len(packed), 0)].tolist()
        rows[row] = torch.tensor(packed[:length], dtype=torch.long)
    return rows, is_answer


def _save_checkpoint(folder: Path, model, optimizer, step: int, generator: torch.Generator, config: PretrainConfig,
                     elapsed: float) -> None:
    """The whole run after `step` steps, with the generator the windows are drawn from, in one file."""
    save_file(folder / CHECKPOINT_FILE, {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "config": dataclasses.asdict(config),
        "elapsed_seconds": elapsed,
    })


def _load_checkpoint(config: PretrainConfig) -> dict | None:
    """The saved state of this run, if a checkpoint exists; a checkpoint of another run is refused."""
    saved = load_file(config.checkpoint_path / CHECKPOINT_FILE)
    if saved is None:
        return None
    saved["config"] = {OLD_NAMES.get(key, key): value for key, value in saved["config"].items()}
    if run_differences(saved["config"], dataclasses.asdict(config), ignore=NOT_IDENTITY):
        raise RopescopeError(
            f"checkpoint in {str(config.checkpoint_path)!r} was written by a different configuration; "
            "delete it or pass another --checkpoint-dir"
        )
    return saved


def _setup_tokenizer(config: PretrainConfig, documents: list[str], resuming: bool):
    """The run's tokenizer, kept in the checkpoint folder (`_keep_tokenizer`): a resumed run must see exactly the
    same ids."""
    folder = config.checkpoint_path / "tokenizer"
    if resuming and folder.is_dir():
        return AutoTokenizer.from_pretrained(folder)  # the run's own tokenizer alone, no model config beside it
    if config.init_from is not None:
        return load_tokenizer(config.init_from)
    return train_tokenizer(documents, config.vocab_size)


def _keep_tokenizer(config: PretrainConfig, tokenizer) -> None:
    folder = config.checkpoint_path / "tokenizer"
    if not folder.is_dir():
        with atomic_path(folder) as temporary:
            tokenizer.save_pretrained(temporary)


def _setup_tokens(tokenizer, documents: list[str], length: int) -> torch.Tensor:
    """The train split as one int32 stream of token ids, an end-of-text token after each document."""
    separator = [tokenizer.eos_token_id]
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"] + separator)
    tokens = torch.tensor(ids, dtype=torch.int32)  # int32 halves the memory of the one copy we keep
    if tokens.numel() <= length:
        raise RopescopeError(
            f"train split has {tokens.numel()} tokens; length={length} needs more than that"
        )
    return tokens


def _setup_model(config: PretrainConfig, tokenizer):
    """The model (fresh, or `init_from`) and its AdamW optimizer (no weight decay on norms and biases)."""
    if config.init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(config.init_from, dtype=torch.float32, attn_implementation="sdpa")
    else:
        model = build_model(config, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8,
    )
    return model, optimizer


def _train_loop(config: PretrainConfig, model, optimizer, tokens: torch.Tensor, passkeys: PasskeyPrompts,
                generator: torch.Generator, start_step: int, elapsed_before: float,
                progress: bool | None) -> list[float]:
    """`run_steps` from `start_step` to `steps` with this recipe's data (`_batch`, drawn from `generator`), a loss
    line every `log_every` steps and a checkpoint every `checkpoint_every`; returns each step's loss."""
    model.train()
    started = time.time()
    losses: list[float] = []

    def log(record: StepRecord) -> None:
        losses.append(record.loss)
        if record.step % config.log_every == 0 or record.step == config.steps:
            seconds = time.time() - started
            recent = sum(losses[-config.log_every:]) / len(losses[-config.log_every:])
            rate = (record.step - start_step) * config.batch_size * config.length / max(seconds, 1e-9)
            print(f"step {record.step}/{config.steps} loss {recent:.4f} lr {record.lr:.2e} "
                  f"{rate:.0f} tokens/s elapsed {elapsed_before + seconds:.0f}s", flush=True)

    def save_checkpoint(step: int) -> None:
        _save_checkpoint(config.checkpoint_path, model, optimizer, step, generator, config,
                         elapsed_before + time.time() - started)

    steps = Steps(steps=config.steps, batch_size=config.batch_size, grad_accum=1, length=config.length,
                  max_grad_norm=1.0, checkpoint_every=config.checkpoint_every,
                  batch_at=lambda step, micro_step: _batch(tokens, passkeys, config, generator),
                  lr_at=lambda step: lr_at(step, config), after_step=log, save_checkpoint=save_checkpoint,
                  label="pretrain", progress=progress)
    run_steps(PlainTorch(), CausalLMLoss(model, config.answer_loss_weight), optimizer, steps, start_step)
    return losses


def _summary(config: PretrainConfig, parameters: int, train_tokens: int, losses: list[float], seconds: float) -> dict:
    summary = {
        "config": dataclasses.asdict(config),
        "parameters": parameters,
        "train_tokens": train_tokens,
        # mean training loss of every `log_every` steps of this run (a resumed run starts at its checkpoint)
        "loss_curve": [round(sum(chunk) / len(chunk), 4) for chunk in
                       (losses[i : i + config.log_every] for i in range(0, len(losses), config.log_every))],
        "wall_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    summary["config"]["out"] = None  # a machine path says nothing about the model
    summary["config"]["checkpoint_dir"] = None
    if config.init_from is not None:
        summary["config"]["init_from"] = Path(config.init_from).name
    return summary


def _write_output(output: Path, model, tokenizer, summary: dict) -> None:
    """The HF model folder, written aside and swapped in, so `output` is never half-written."""
    with atomic_path(output) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def pretrain(config: PretrainConfig, progress: bool | None = None) -> Path:
    """Run the pretraining described by `config`; returns the output folder (HF model + tokenizer).

    Resumes from `<checkpoint_dir>/checkpoint.pt` when it was written by the same configuration.
    """
    validate(config)
    output = Path(config.out)
    if output.exists() and not output.is_dir():
        raise RopescopeError(f"out={str(output)!r} exists and is not a folder")
    documents = load_corpus(config.corpus, split="train")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    saved_state = _load_checkpoint(config)
    tokenizer = _setup_tokenizer(config, documents, resuming=saved_state is not None)
    tokens = _setup_tokens(tokenizer, documents, config.length)
    model, optimizer = _setup_model(config, tokenizer)
    # every input is checked: the first file of the run is written now
    config.checkpoint_path.mkdir(parents=True, exist_ok=True)
    _keep_tokenizer(config, tokenizer)

    generator = torch.Generator().manual_seed(config.seed)
    start_step, elapsed_before = 0, 0.0
    if saved_state is not None:
        model.load_state_dict(saved_state["model"])
        optimizer.load_state_dict(saved_state["optimizer"])
        generator.set_state(saved_state["generator"])
        torch.set_rng_state(saved_state["torch_rng"])
        start_step, elapsed_before = saved_state["step"], saved_state["elapsed_seconds"]
        print(f"resuming from step {start_step} ({config.checkpoint_path / CHECKPOINT_FILE})", flush=True)
    del saved_state

    parameters = sum(p.numel() for p in model.parameters())
    print(f"pretraining {parameters / 1e6:.2f}M parameters on {tokens.numel()} train tokens, {config.steps} steps; "
          + batch_arithmetic(config.batch_size, 1, 1, config.length), flush=True)
    started = time.time()
    losses = _train_loop(config, model, optimizer, tokens, PasskeyPrompts(tokenizer), generator, start_step,
                         elapsed_before, progress)
    model.eval()
    summary = _summary(config, parameters, int(tokens.numel()), losses, elapsed_before + time.time() - started)
    _write_output(output, model, tokenizer, summary)
    shutil.rmtree(config.checkpoint_path, ignore_errors=True)
    return output
