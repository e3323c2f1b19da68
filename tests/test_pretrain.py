import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import ropescope.train.pretrain as pretrain_module
from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.tasks.passkey import QUESTION, PasskeyPrompts
from ropescope.train.pretrain import PretrainConfig, pretrain, train_tokenizer

TEXT = [
    f"Scene {i}. Enter the king and the queen, with lords attending. The king speaks of the storm, "
    f"and the queen answers that the night is long. Number {i * 37} of the watch keeps the gate.\n" * 8
    for i in range(40)
]


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index, text in enumerate(TEXT):
        (folder / f"{index:02d}.txt").write_text(text)
    return folder


def tiny(corpus, output, **overrides):
    settings = dict(out=str(output), corpus=str(corpus), steps=30, batch_size=4, length=64,
                    learning_rate=1e-2, warmup_steps=5, vocab_size=320, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64, passkey_min_length=48, checkpoint_every=10, log_every=10, threads=1)
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_tiny_pretraining_loss_falls_and_output_loads(corpus, tmp_path, capsys):
    output = pretrain(tiny(corpus, tmp_path / "model"), progress=False)
    assert "tokens per optimizer step: 256 = batch_size 4 x processes 1 x grad_accum 1 x length 64" in \
        capsys.readouterr().out
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["loss_curve"][-1] < summary["loss_curve"][0] - 1.0
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.config.max_position_embeddings == 64 and model.config.tie_word_embeddings
    assert model.config.rope_parameters["rope_type"] == "default"
    assert len(tokenizer) == model.config.vocab_size
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus", "model"]  # no checkpoint, no temporary


def test_resume_after_a_kill_gives_the_same_model(corpus, tmp_path, monkeypatch):
    reference = pretrain(tiny(corpus, tmp_path / "reference", steps=20), progress=False)

    real_batch, calls = pretrain_module._batch, []

    def dying_batch(*args):
        calls.append(1)
        if len(calls) > 15:
            raise KeyboardInterrupt  # stands in for a kill between checkpoints
        return real_batch(*args)

    monkeypatch.setattr(pretrain_module, "_batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(corpus, tmp_path / "resumed", steps=20), progress=False)
    assert (tmp_path / "resumed.checkpoint" / "checkpoint.pt").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(pretrain_module, "_batch", real_batch)
    resumed = pretrain(tiny(corpus, tmp_path / "resumed", steps=20), progress=False)
    expected, actual = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_tokenizer_splits_digits_and_passkey_examples_end_with_the_key():
    tokenizer = train_tokenizer(TEXT, 320)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("The pass key is 48213.", add_special_tokens=False)["input_ids"])
    assert tokens[-6:] == ["4", "8", "2", "1", "3", "."]
    examples = PasskeyPrompts(tokenizer)
    generator = torch.Generator().manual_seed(0)
    for length in (48, 100, 256):
        ids, answer_length = examples.training_example(length, generator)
        text = tokenizer.decode(ids)
        assert len(ids) == length and answer_length == 6  # " " and one token per digit
        assert tokenizer.decode(ids[-answer_length:]) == " " + text.rsplit(" ", 1)[-1]
        key = text.rsplit(" ", 1)[-1]
        assert len(key) == 5 and key.isdigit() and text.endswith(f"{QUESTION} {key}")
        assert f"The pass key is {key}. Remember it." in text or length == 48


def test_bad_configuration_is_one_line(corpus, tmp_path, capsys):
    with pytest.raises(RopescopeError, match="retrieval_mix=1.5"):
        pretrain(tiny(corpus, tmp_path / "m", retrieval_mix=1.5))
    with pytest.raises(RopescopeError, match="not divisible"):
        pretrain(tiny(corpus, tmp_path / "m", hidden_size=30, num_heads=4))
    assert main(["pretrain", "--out", str(tmp_path / "m"), "--corpus", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_continue_from_a_saved_model(corpus, tmp_path):
    first = pretrain(tiny(corpus, tmp_path / "first", steps=10), progress=False)
    second = pretrain(tiny(corpus, tmp_path / "second", steps=10, init_from=str(first), retrieval_mix=0.75,
                           passkey_packed_share=1.0, passkey_min_length=40), progress=False)
    assert AutoTokenizer.from_pretrained(second).get_vocab() == AutoTokenizer.from_pretrained(first).get_vocab()
    summary = json.loads((second / "training_summary.json").read_text())
    assert summary["config"]["init_from"] == "first"
    with pytest.raises(RopescopeError, match="init_from"):
        pretrain(tiny(corpus, tmp_path / "third", init_from=str(tmp_path / "nowhere")))
