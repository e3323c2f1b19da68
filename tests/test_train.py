"""Continual pretraining: equivalence across process counts and accumulation, exact resume, bad input.

Everything runs on a tiny random Llama (hidden 64, 2 layers) with a small byte-level BPE tokenizer trained here,
saved as a local Hugging Face folder, so the real loading path is exercised without downloads.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ropescope.cli import main
from ropescope.train.batch import batch_size_for
from ropescope.train.continual import TrainConfig, block_indices, train
from ropescope.train.schedule import lr_at, lr_by_multiplier

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("the river ran past old stone walls while green birds sang of rain and light over quiet hills "
         "a small boat drifted near the mill where children counted seven bright lanterns").split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second spinning thread makes tiny steps 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny random Llama with its tokenizer in a folder, and a corpus of 120 short documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + "." for _ in range(120)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return {"model": str(model_dir), "corpus": str(corpus), "root": root}


def _config(tiny, out, **overrides) -> TrainConfig:
    values = dict(out=out, model=tiny["model"], corpus=tiny["corpus"], method="yarn", factor=2.0, length=48,
                  steps=4, batch_size=4, learning_rate=3e-3, warmup_steps=1, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def _losses(out) -> list[tuple[int, float]]:
    with (Path(out) / "metrics.csv").open(newline="") as file:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(file)]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    return env


def _cli_args(config: TrainConfig) -> list[str]:
    return ["--model", config.model, "--corpus", config.corpus, "--method", config.method, "--factor",
            str(config.factor), "--length", str(config.length), "--steps", str(config.steps), "--batch-size",
            str(config.batch_size), "--learning-rate", str(config.learning_rate), "--warmup-steps", str(config.warmup_steps),
            "--checkpoint-every", str(config.checkpoint_every), "--out", str(config.out)]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(out="x", steps=10, warmup_steps=2, learning_rate=1.0, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, config) == pytest.approx(1.0)
    assert lr_at(6, config) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    linear = TrainConfig(out="x", steps=10, warmup_steps=0, learning_rate=1.0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(5, linear) == pytest.approx(0.5)


def test_the_rate_of_train_is_the_one_lambda_lr_gave_it_to_the_last_bit():
    """Runs made while train stepped a LambdaLR stay bit-identical: its rate is the peak times lr_at / peak."""
    config = TrainConfig(out="x", steps=50, warmup_steps=3, learning_rate=1e-3)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, config) / config.learning_rate)
    rates = []
    for _ in range(config.steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [lr_by_multiplier(step, config) for step in range(config.steps)]
    assert rates == pytest.approx([lr_at(step, config) for step in range(config.steps)], rel=1e-15)


def test_each_global_batch_is_the_same_blocks_whatever_the_process_count():
    for step in range(7):  # 7 steps of 8 blocks over 20 blocks: crosses two epoch boundaries
        one = block_indices(step, 0, 0, 20, TrainConfig(out="x", batch_size=8), 1)
        two = [i for rank in range(2) for i in block_indices(step, 0, rank, 20, TrainConfig(out="x", batch_size=4), 2)]
        accumulated = [i for micro in range(2) for rank in range(2)
                       for i in block_indices(step, micro, rank, 20, TrainConfig(out="x", batch_size=2, grad_accum=2), 2)]
        assert one == two == accumulated
    epoch = [i for step in range(5) for i in block_indices(step, 0, 0, 20, TrainConfig(out="x", batch_size=4), 1)]
    assert sorted(epoch) == list(range(20))  # an epoch visits every block once


def test_train_writes_a_checkpoint_that_loads_with_the_extension_active(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ropescope import extend
    from ropescope.model.load import load
    from ropescope.rope import parse_spec

    out = train(_config(tiny, tmp_path / "run", steps=3))
    assert [step for step, _ in _losses(out)] == [1, 2, 3]
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.csv", "run.json"} <= {
        p.name for p in out.iterdir()}

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    # The same trained weights on the original model with the extension applied by hand: same logits.
    reference = load(tiny["model"]).model
    extend(reference, parse_spec("yarn", factor=2.0, original_max_position_embeddings=64))
    reference.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    reference.tie_weights()
    input_ids = torch.randint(0, 300, (1, 150))  # past the original 64 positions and the 48 trained on
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, reference.eval()(input_ids).logits, atol=1e-5, rtol=1e-5)
    base = load(tiny["model"]).model
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids).logits, base(input_ids).logits, atol=1e-3)


def test_gradient_accumulation_and_checkpointing_match_one_big_batch(tiny, tmp_path):
    big = _losses(train(_config(tiny, tmp_path / "big", steps=3)))
    accumulated = _losses(train(_config(tiny, tmp_path / "acc", steps=3, batch_size=2, grad_accum=2,
                                        gradient_checkpointing=True)))
    assert [s for s, _ in big] == [s for s, _ in accumulated]
    torch.testing.assert_close([l for _, l in accumulated], [l for _, l in big], rtol=1e-5, atol=1e-6)


def test_two_processes_with_half_the_batch_follow_the_one_process_trajectory(tiny, tmp_path):
    one = _config(tiny, tmp_path / "one", steps=4, batch_size=4)
    two = _config(tiny, tmp_path / "two", steps=4, batch_size=2)
    with socket.socket() as probe:  # a free port, so parallel test runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `--multi_gpu` is accelerate's multi-process launcher (torchrun); without CUDA, train() joins the processes
    # over gloo. (`--cpu` would start one process: accelerate's CPU launcher spreads only through mpirun.)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "ropescope", "train", *_cli_args(two)]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two.out / "run.json").read_text())["num_processes"] == 2
    expected = _losses(train(one))
    got = _losses(two.out)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    torch.testing.assert_close([l for _, l in got], [l for _, l in expected], rtol=1e-5, atol=1e-6)
    assert expected[-1][1] < expected[0][1]  # it learns


def test_the_batch_arithmetic_is_one_function_and_printed_once_at_the_start(tiny, tmp_path, capsys):
    assert [batch_size_for(8192, length) for length in (512, 1024, 3000, 16384)] == [16, 8, 2, 1]
    out = train(_config(tiny, tmp_path / "run", steps=2, batch_size=2, grad_accum=2, progress=True))
    printed = capsys.readouterr().err
    line = "tokens per optimizer step: 192 = batch_size 2 x processes 1 x grad_accum 2 x length 48"
    assert printed.count(line) == 1
    assert (out / "metrics.csv").read_text().splitlines()[0] == "step,loss,lr,tokens_per_s"  # not in the metrics


def test_a_killed_run_resumes_on_the_exact_trajectory(tiny, tmp_path):
    steps, every = 150, 10
    reference = _losses(train(_config(tiny, tmp_path / "reference", steps=steps, batch_size=2, length=32)))

    killed = _config(tiny, tmp_path / "killed", steps=steps, batch_size=2, length=32, checkpoint_every=every)
    process = subprocess.Popen([sys.executable, "-m", "ropescope", "train", *_cli_args(killed)], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = killed.out / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.exists() and list(checkpoints.glob("step-*"))):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (killed.out / "model.safetensors").exists(), "the run finished before it could be killed"
    assert len(_losses(killed.out)) < steps

    killed.resume = True
    train(killed)
    resumed = _losses(killed.out)
    assert [s for s, _ in resumed] == list(range(1, steps + 1))  # no step lost, none repeated
    torch.testing.assert_close([l for _, l in resumed], [l for _, l in reference], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dies", ["writing", "publishing"])
def test_a_run_killed_during_its_final_save_is_finished_by_the_rerun(tiny, tmp_path, monkeypatch, dies):
    """Killed while the final checkpoint is written (the staging folder half full) or published (moved file by file
    into the run folder): the folder never looks complete, and the rerun with resume ends with the checkpoint an
    uninterrupted run writes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

    import ropescope.train.continual as train_module

    reference = train(_config(tiny, tmp_path / "reference", steps=3, checkpoint_every=2))
    config = _config(tiny, tmp_path / "killed", steps=3, checkpoint_every=2)
    if dies == "writing":  # the weights are written, the tokenizer never is
        def die(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", die)
    else:  # the first file is moved in, then the process dies
        real_replace, moves = os.replace, []

        def replace(source, target):
            if Path(source).parent.name == train_module.STAGED:
                moves.append(target)
                if len(moves) > 1:
                    raise KeyboardInterrupt
            real_replace(source, target)
        monkeypatch.setattr(train_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    assert not train_module._is_complete(config.out, 3) and not (config.out / "config.json").exists()
    assert (config.out / train_module.STAGED).is_dir() == (dies == "publishing")
    with pytest.raises((OSError, ValueError)):  # not a loadable checkpoint: neither half of one nor a previous one
        AutoModelForCausalLM.from_pretrained(config.out)

    config.resume = True
    train(config)
    assert train_module._is_complete(config.out, 3)
    assert sorted(path.name for path in config.out.iterdir()) == sorted(path.name for path in reference.iterdir())
    expected, actual = load_file(reference / "model.safetensors"), load_file(config.out / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert _losses(config.out) == _losses(reference)


def test_lora_trains_adapters_and_saves_a_merged_plain_checkpoint(tiny, tmp_path):
    from safetensors.torch import load_file

    out = train(_config(tiny, tmp_path / "lora", steps=2, lora_rank=4))
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in name for name in weights)
    base = load_file(Path(tiny["model"]) / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[name], base[name])  # the merged adapter moved the projection
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(weights[name], base[name])  # and nothing outside the adapted projections


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("change, expected", [
    (["--length", "0"], "length=0 is not a positive integer"),
    (["--length", "-5"], "length=-5 is not a positive integer"),
    (["--method", "nope"], "unknown RoPE method 'nope'; accepted: default, linear"),
    (["--length", "100000"], "tokens, and one global batch of 4 blocks needs 400000"),
    (["--factor", "0.5"], "yarn factor=0.5 must be >= 1"),
    (["--model", "/nonexistent/model"], "model '/nonexistent/model' is not a folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, change, expected):
    out = tmp_path / "run"
    argv = ["train", *_cli_args(_config(tiny, out)), *change]
    assert expected in _cli_error(capsys, argv)
    assert not out.exists()


def test_a_checkpoint_of_the_earlier_layout_resumes(tiny, tmp_path):
    # Earlier versions registered a LambdaLR before the loop state: custom_checkpoint_0 was the scheduler (pickled
    # with module paths that have moved since) and _1 the step. Such a folder resumes without reading the former.
    steps = 6
    reference = train(_config(tiny, tmp_path / "reference", steps=steps, batch_size=2, length=32))
    stopped = _config(tiny, tmp_path / "stopped", steps=steps, batch_size=2, length=32, checkpoint_every=3)
    train(stopped)
    (folder,) = (stopped.out / "checkpoints").glob("step-*")
    (folder / "custom_checkpoint_0.pkl").rename(folder / "custom_checkpoint_1.pkl")
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"a scheduler this version cannot unpickle")
    for name in ("model.safetensors", "config.json"):
        (stopped.out / name).unlink()
    metrics = (stopped.out / "metrics.csv").read_text().splitlines()
    (stopped.out / "metrics.csv").write_text("\n".join(metrics[:4]) + "\n")  # the header and steps 1-3
    stopped.resume = True
    train(stopped)
    assert [s for s, _ in _losses(stopped.out)] == list(range(1, steps + 1))
    assert (stopped.out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_an_output_folder_with_another_run_is_refused_unless_resume_or_overwrite(tiny, tmp_path, capsys):
    config = _config(tiny, tmp_path / "run", steps=1)
    argv = ["train", *_cli_args(config)]
    assert main(argv) == 0
    capsys.readouterr()
    before = (config.out / "metrics.csv").read_text()

    message = _cli_error(capsys, [*argv, "--learning-rate", "0.01"])
    assert "holds a different run (learning_rate=0.003 there vs 0.01 here)" in message
    assert "already holds this run; pass resume" in _cli_error(capsys, argv)
    assert "holds a different run" in _cli_error(capsys, [*argv, "--learning-rate", "0.01", "--resume"])
    assert (config.out / "metrics.csv").read_text() == before  # refused before writing anything

    assert main([*argv, "--learning-rate", "0.01", "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((config.out / "run.json").read_text())["config"]["learning_rate"] == 0.01

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert "not a ropescope training run" in _cli_error(capsys, ["train", *_cli_args(config), "--out", str(stranger),
                                                               "--overwrite"])


def test_a_full_spec_replaces_method_and_factor(tiny, tmp_path):
    out = train(_config(tiny, tmp_path / "spec", steps=1, spec={"method": "linear", "factor": 3.0}))
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear"
    assert config["rope_parameters"]["factor"] == 3.0
    assert json.loads((out / "run.json").read_text())["spec"] == {"method": "linear", "factor": 3.0}


def _tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])


@pytest.mark.parametrize("mix", [-0.1, 1.0, 1.5])
def test_retrieval_mix_outside_zero_to_one_is_refused(mix):
    from ropescope.errors import RopescopeError
    from ropescope.train.continual import validate

    with pytest.raises(RopescopeError, match=f"retrieval_mix={mix} is outside"):
        validate(TrainConfig(out="x", retrieval_mix=mix))


def test_retrieval_mix_puts_passkey_examples_of_the_training_length_with_answer_masks(tiny):
    from ropescope.tasks.passkey import KEY_LINE, QUESTION, PasskeyPrompts
    from ropescope.train.continual import micro_batch

    tokenizer = _tokenizer(tiny)
    length = 400
    config = TrainConfig(out="x", length=length, batch_size=64, retrieval_mix=0.5, seed=3)
    blocks = torch.randint(0, 300, (80, length), generator=torch.Generator().manual_seed(0))
    slots, indices = range(64, 128), list(range(64))
    input_ids, is_answer = micro_batch(blocks, slots, indices, config, PasskeyPrompts(tokenizer))
    assert input_ids.shape == is_answer.shape == (64, length)
    passkey_rows = [row for row in range(64) if not torch.equal(input_ids[row], blocks[row])]
    assert 16 <= len(passkey_rows) <= 48  # about half, drawn per slot
    answers_per_row = []
    for row in range(64):
        ids = input_ids[row].tolist()
        marked = [position for position in range(length) if is_answer[row, position]]
        if row not in passkey_rows:
            assert not marked
            continue
        # Each marked run of tokens is " KEY", right after the question, and the key line with that key is earlier.
        runs = [[marked[0]]]
        for position in marked[1:]:
            runs[-1].append(position) if position == runs[-1][-1] + 1 else runs.append([position])
        # One example of the training length ends the row with its answer; packed short ones end earlier.
        answers_per_row.append(len(runs) if runs[-1][-1] < length - 1 else "full")
        for run in runs:
            answer = tokenizer.decode(ids[run[0] : run[-1] + 1])
            key = answer.strip()
            assert answer == f" {key}" and len(key) == 5 and key.isdigit()
            before = tokenizer.decode(ids[: run[0]])
            assert before.endswith(QUESTION) and KEY_LINE.format(key=key).split(".")[0] in before
    assert "full" in answers_per_row and max(n for n in answers_per_row if n != "full") > 1

    # A slot's draw does not depend on which micro-batch or process it lands in.
    first, first_answer = micro_batch(blocks, range(64, 96), indices[:32], config, PasskeyPrompts(tokenizer))
    assert torch.equal(first, input_ids[:32]) and torch.equal(first_answer, is_answer[:32])


def test_corpus_haystacks_put_the_blocks_own_text_around_each_key(tiny):
    from ropescope.tasks.passkey import FILLER, KEY_LINE, PasskeyPrompts
    from ropescope.train.continual import _identity, micro_batch

    tokenizer = _tokenizer(tiny)
    length = 300
    text = " ".join(f"Sentence {index} tells of a river and a town." for index in range(400))
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    blocks = stream[: (len(stream) // length) * length].view(-1, length)[:40]
    config = TrainConfig(out="x", length=length, batch_size=40, retrieval_mix=0.5, seed=1, retrieval_haystack="corpus")
    input_ids, is_answer = micro_batch(blocks, range(40), list(range(40)), config, PasskeyPrompts(tokenizer))
    filler = tokenizer.decode(tokenizer(FILLER, add_special_tokens=False)["input_ids"][:4])
    keyed, text_before, text_after = 0, 0, 0
    for row in range(40):
        decoded = tokenizer.decode(input_ids[row])
        assert filler not in decoded
        if is_answer[row].any():
            keyed += 1
            key = tokenizer.decode(input_ids[row][is_answer[row]][:6]).strip()[:5]
            at = decoded.index(KEY_LINE.format(key=key).split(".")[0])
            text_before += "river" in decoded[:at]  # the block's own text, unless the depth drawn was near 0
            text_after += "river" in decoded[at:]  # and after it, unless the depth was near 100%
    assert 10 <= keyed <= 30 and text_before >= keyed // 2 and text_after >= keyed // 2
    # filler, the default, is the same run as before the option existed; corpus is recorded
    plain = TrainConfig(out="x", length=length, retrieval_mix=0.5)
    assert "retrieval_haystack" not in _identity(plain, 1)
    assert _identity(config, 40)["retrieval_haystack"] == "corpus"


def test_retrieval_min_length_draws_single_examples_from_it_to_the_training_length(tiny):
    from ropescope.errors import RopescopeError
    from ropescope.tasks.passkey import PasskeyPrompts
    from ropescope.train.continual import _identity, micro_batch, validate

    length, shortest = 400, 120
    blocks = torch.randint(0, 300, (64, length), generator=torch.Generator().manual_seed(0))

    def single_example_ends(config: TrainConfig) -> list[int]:
        """Where the answer of each row holding one example ends (packed rows hold several)."""
        _, is_answer = micro_batch(blocks, range(64), list(range(64)), config, PasskeyPrompts(_tokenizer(tiny)))
        ends = []
        for row in range(64):
            marked = is_answer[row].nonzero()[:, 0].tolist()
            runs = sum(1 for index, position in enumerate(marked) if index == 0 or position != marked[index - 1] + 1)
            if runs == 1:
                ends.append(marked[-1] + 1)
        return ends

    config = TrainConfig(out="x", length=length, batch_size=64, retrieval_mix=0.9, seed=2)
    assert set(single_example_ends(config)) == {length}  # unset: every one of the training length
    spread = single_example_ends(replace(config, retrieval_min_length=shortest))
    assert len(spread) >= 20 and all(shortest <= end <= length for end in spread)
    assert min(spread) < shortest + 100 and max(spread) > length - 100 and len(set(spread)) > len(spread) // 2
    assert "retrieval_min_length" not in _identity(config, 64)  # unset: the same run as before the option
    assert _identity(replace(config, retrieval_min_length=shortest), 64)["retrieval_min_length"] == shortest
    for bad in (0, length + 1):
        with pytest.raises(RopescopeError, match=f"retrieval_min_length={bad} is outside 1..length \\({length}\\)"):
            validate(replace(config, retrieval_min_length=bad))


def test_an_unknown_retrieval_haystack_is_refused():
    from ropescope.errors import RopescopeError
    from ropescope.train.continual import validate

    with pytest.raises(RopescopeError, match="retrieval_haystack='web' is unknown; accepted: filler, corpus"):
        validate(TrainConfig(out="x", retrieval_haystack="web"))


def test_without_retrieval_mix_the_batch_is_the_corpus_blocks_and_the_run_identity_is_unchanged(tiny, tmp_path):
    from ropescope.train.continual import micro_batch

    blocks = torch.randint(0, 300, (10, 8))
    input_ids, is_answer = micro_batch(blocks, range(3), [4, 1, 7], TrainConfig(out="x", length=8), None)
    assert torch.equal(input_ids, blocks[[4, 1, 7]]) and is_answer is None
    out = train(_config(tiny, tmp_path / "plain", steps=1))
    assert "retrieval_mix" not in json.loads((out / "run.json").read_text())["config"]


def test_the_answer_loss_is_added_to_the_language_model_loss(tiny):
    from transformers import AutoModelForCausalLM

    from ropescope.eval.nll import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    with_answers, plain = CausalLMLoss(model, answer_weight=1.0), CausalLMLoss(model, answer_weight=1.0, chunk_size=7)
    input_ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    is_answer = torch.zeros_like(input_ids, dtype=torch.bool)
    is_answer[0, 14:20] = True
    is_answer[1, 17:20] = True
    with torch.no_grad():
        log_probabilities = torch.log_softmax(model(input_ids).logits.double(), dim=-1)
        nll = -log_probabilities[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]  # [2, 19], float64
        expected = nll.mean() + nll[is_answer[:, 1:]].mean()
        torch.testing.assert_close(with_answers(input_ids, is_answer).double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain(input_ids, None).double(), nll.mean(), rtol=1e-5, atol=1e-6)


def test_a_run_with_retrieval_mix_trains_and_records_it(tiny, tmp_path):
    out = train(_config(tiny, tmp_path / "mix", steps=2, length=64, retrieval_mix=0.5))
    assert [step for step, _ in _losses(out)] == [1, 2]
    assert json.loads((out / "run.json").read_text())["config"]["retrieval_mix"] == 0.5


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                                    "gemma2", "gemma3_text", "phi3", "stablelm", "olmo2", "granite", "cohere",
                                    "smollm3", "starcoder2", "ministral3", "gpt_oss"])
def test_gradient_checkpointing_recomputes_every_decoder_layer_of_every_family(family):
    """As train prepares a model: every decoder layer runs twice per step (the forward, and again in the backward),
    and the gradients are those of the step without checkpointing."""
    from transformers import AutoModelForCausalLM

    from ropescope.eval.nll import causal_lm_loss
    from ropescope.train.continual import _prepare_model
    from tests.test_families import VOCAB, family_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).float()
    input_ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    causal_lm_loss(_prepare_model(TrainConfig(out="x"), model, checkpointing=False), input_ids).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    calls = []
    attentions = [layer.self_attn for layer in model.base_model.layers]
    for attention in attentions:  # a layer's own hooks stay outside the checkpoint; its modules' run in it
        attention.register_forward_pre_hook(lambda module, args: calls.append(module))
    causal_lm_loss(_prepare_model(TrainConfig(out="x"), model, checkpointing=True), input_ids).backward()
    assert [calls.count(attention) for attention in attentions] == [2] * len(attentions)
    for name, gradient in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, gradient, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_is_on_where_it_pays_and_the_run_records_it(tiny, tmp_path):
    from transformers import AutoConfig, LlamaConfig

    from ropescope.train.continual import uses_checkpointing

    tiny_config = AutoConfig.from_pretrained(tiny["model"])  # 2 layers of hidden 64: activations pass the state soon
    assert not uses_checkpointing(TrainConfig(out="x", length=48), tiny_config, "no")
    assert uses_checkpointing(TrainConfig(out="x", length=4096), tiny_config, "no")
    assert not uses_checkpointing(TrainConfig(out="x", length=4096, gradient_checkpointing=False), tiny_config, "no")
    llama_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           vocab_size=32000)
    assert not uses_checkpointing(TrainConfig(out="x", length=2048), llama_7b, "bf16")
    assert uses_checkpointing(TrainConfig(out="x", length=32768), llama_7b, "bf16")  # the paper's fine-tune
    # on a device the step fits easily, the third more compute buys nothing; on an 80 GB GPU the paper's needs it
    assert not uses_checkpointing(TrainConfig(out="x", length=4096), tiny_config, "no", device_memory=24 * 2**30)
    assert uses_checkpointing(TrainConfig(out="x", length=32768), llama_7b, "bf16", device_memory=80 * 2**30)
    for length, asked, expected in ((48, None, False), (2048, None, False), (2048, True, True)):
        out = train(_config(tiny, tmp_path / f"run-{length}-{asked}", steps=1, length=length, batch_size=1,
                            gradient_checkpointing=asked))
        assert json.loads((out / "run.json").read_text())["gradient_checkpointing"] is expected
