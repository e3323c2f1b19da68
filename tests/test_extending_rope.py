"""The worked example of adding a RoPE method: one `RopeMethod` object, registered from a module outside the
package, and nothing in src/ changed. It is then validated, applied by `extend` to the shipped model, saved and
loaded back by plain transformers to the same logits, listed by `ropescope methods`, and run by a study."""

import importlib.util
import sqlite3
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ropescope import METHODS, RopescopeError, RopeSpec, extend, load, parse_spec, rope_frequencies
from ropescope.cli import main
from ropescope.rope import unregister
from ropescope.study.config import parse_config, quick_config_path
from ropescope.study.run.runner import DATABASE, run_study
from ropescope.study.stages import STAGES

# A method as a user would write it: position interpolation on the long wavelengths only (the pairs that never
# complete a rotation within `threshold` x the original length), the short ones kept. Its own rule (threshold > 0)
# sits beside it; the shared checks (factor >= 1, a whole original length, unknown keys) come from the registry.
METHOD_MODULE = '''
    import math

    import torch

    from ropescope.errors import RopescopeError
    from ropescope.rope import REQUIRED, RopeMethod, register
    from ropescope.rope.registry import number


    def long_wave_pi(params, dim, base, seq_len):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        wavelength = 2 * math.pi / inv_freq
        longest = params["threshold"] * params["original_max_position_embeddings"]
        return torch.where(wavelength > longest, inv_freq / params["factor"], inv_freq), 1.0


    def check(params):
        params["threshold"] = number("long_wave_pi", "threshold", params["threshold"])
        if params["threshold"] <= 0:
            raise RopescopeError(f"long_wave_pi threshold={params['threshold']:g} must be > 0")
        return params


    METHOD = register(RopeMethod(
        "long_wave_pi", long_wave_pi,
        {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, "threshold": 1.0},
        "position interpolation on the wavelengths longer than threshold x the original length",
        example='RopeSpec("long_wave_pi", factor=2.0, original_max_position_embeddings=256)',
        check=check, saved_length="original",
    ))
'''
NAME = "long_wave_pi"
PRETRAINED = 256  # the shipped model's length


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    """The method's module written outside the package and imported; unregistered afterwards."""
    path = tmp_path_factory.mktemp("method") / "long_wave_pi_method.py"
    path.write_text(textwrap.dedent(METHOD_MODULE))
    module_spec = importlib.util.spec_from_file_location("long_wave_pi_method", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    yield module.METHOD
    unregister(NAME)
    sys.modules.pop(module_spec.name)
    assert NAME not in METHODS


def test_its_parameters_are_validated_in_one_line(method):
    spec = parse_spec(f"{NAME}:threshold=0.5", factor=2.0, original_max_position_embeddings=PRETRAINED)
    assert spec.params == {"factor": 2.0, "original_max_position_embeddings": PRETRAINED, "threshold": 0.5}
    assert spec.label() == f"{NAME} x2" and parse_spec(spec.to_text()) == spec
    for params, message in [
        ({"factor": 2.0, "original_max_position_embeddings": PRETRAINED, "threshold": 0}, "threshold=0 must be > 0"),
        ({"factor": 0.5, "original_max_position_embeddings": PRETRAINED}, "factor=0.5 must be >= 1"),
        ({"factor": 2.0, "original_max_position_embeddings": PRETRAINED, "beta": 1}, "takes no parameter 'beta'"),
        ({"factor": 2.0}, f"{NAME} needs 'original_max_position_embeddings' (e.g. RopeSpec(\"{NAME}\""),
    ]:
        with pytest.raises(RopescopeError) as error:
            RopeSpec(NAME, **params)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_its_frequencies_interpolate_the_long_wavelengths_only(method):
    spec = RopeSpec(NAME, factor=4.0, original_max_position_embeddings=PRETRAINED)
    inv_freq, scale = rope_frequencies(spec, head_dim=64)
    original, _ = rope_frequencies(RopeSpec("default"), head_dim=64)
    long = 2 * torch.pi / original > PRETRAINED
    assert long.any() and not long.all() and scale == 1.0
    torch.testing.assert_close(inv_freq[long], original[long] / 4, rtol=0, atol=0)
    torch.testing.assert_close(inv_freq[~long], original[~long], rtol=0, atol=0)


def test_extend_save_and_plain_transformers_give_the_same_logits(method, tmp_path):
    spec = RopeSpec(NAME, factor=2.0, original_max_position_embeddings=PRETRAINED)
    shipped = load("default")
    model = extend(shipped.model, spec)
    model.save_pretrained(tmp_path)
    shipped.tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["rope_type"] == NAME
    assert reloaded.config.max_position_embeddings == PRETRAINED  # its saved_length: the original length
    ids = torch.randint(0, model.config.vocab_size, (1, 2 * PRETRAINED), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    loaded = load(tmp_path)  # ropescope's own loader gives the recorded method back
    assert loaded.labels.method == NAME and loaded.labels.rope == spec.to_text()


def test_ropescope_methods_lists_it(method, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert f"\n{NAME} " in "\n" + out and "threshold = 1.0" in out


def test_a_study_runs_it_from_a_methods_table(method, tmp_path):
    data = tomllib.loads(Path(quick_config_path()).read_text())
    data["methods"] = {"original": {"method": "default"}, "mine": {"method": NAME, "factor": 2.0}}
    data["training"].update(lengths=[], include_untrained=True)  # no fine-tuning: seconds, not a minute
    config = parse_config(data, STAGES)
    assert config.methods["mine"] == RopeSpec(NAME, factor=2.0, original_max_position_embeddings=PRETRAINED)
    stages = tuple(stage for stage in STAGES if stage.name in ("train", "scale_fit", "perplexity"))
    run_study(config, tmp_path, log=lambda line: None, stages=stages)
    with sqlite3.connect(tmp_path / DATABASE) as connection:
        methods = {row for (row,) in connection.execute("SELECT json_extract(data, '$.method') FROM rows")}
    assert methods == {"default", NAME}
