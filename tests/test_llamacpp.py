"""llama.cpp run, not re-derived: the exported file's next-token logits in llama.cpp (llama-cpp-python 0.3.36, CPU,
f32 export, f32 KV cache) against transformers' on the saved folder, on the same tokens.

Skipped where llama_cpp is not importable, except in CI, which installs it and sets ROPESCOPE_REQUIRE_LLAMACPP=1:
there a missing llama_cpp fails instead of skipping.

Measured (docs/export.md), x2 extensions, largest absolute logit difference over every position: the shipped
model at 256 / 512 tokens, linear 2.8e-5 / 3.0e-5, ntk 2.7e-5 / 4.8e-5, yarn 4.8e-5 / 2.0e-4, llama3 2.5e-5 /
8.7e-5 (logits span about +-10); SmolLM2-135M yarn x2, last position, 5.5e-5 at 1,024 tokens and 2.9e-4 at 8,192
(logits up to 30). TOLERANCE is 5x the largest. An export with YaRN's attention factor dropped (x2) differs by
1.8 at 256 tokens and 2.9 at 512.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from ropescope import RopeSpec, extend
from ropescope.commands.export import run_export
from ropescope.errors import RopescopeError
from ropescope.io.data import load_corpus
from ropescope.model.export import check_exportable, write_gguf
from ropescope.model.gguf import packaged_gguf_path
from ropescope.model.llamacpp import llamacpp_mscale
from ropescope.model.llamacpp_run import largest_difference
from ropescope.model.load import load, load_tokenizer

REQUIRED = os.environ.get("ROPESCOPE_REQUIRE_LLAMACPP") == "1"
try:
    import llama_cpp  # noqa: F401 (the module runs it through ropescope.model.llamacpp_run)
except ImportError as error:  # the bindings build llama.cpp when installed: not every machine has them
    if REQUIRED:
        raise
    pytest.skip(f"llama_cpp is not importable ({error}); pip install llama-cpp-python==0.3.36", allow_module_level=True)

PRETRAINED = 256  # the shipped model's length
TOLERANCE = 1e-3  # largest absolute logit difference, every position (measured 2.1e-4)
SMOLLM2_TOLERANCE = 1e-3  # SmolLM2-135M, last position of 1,024 tokens (measured 5.5e-5; up to 9.8e-4 at 16,384:
# benchmarks/llamacpp_smollm2.py)
METHODS = [
    RopeSpec("linear", factor=2.0),
    RopeSpec("ntk", factor=2.0),
    RopeSpec("yarn", factor=2.0, original_max_position_embeddings=PRETRAINED),
    RopeSpec("llama3", factor=2.0, original_max_position_embeddings=PRETRAINED),
]


@pytest.fixture(scope="module")
def tokens():
    """The shipped corpus's validation text in the shipped tokenizer, twice the pretrained length."""
    text = " ".join(load_corpus(None, split="validation"))
    ids = load_tokenizer("default")(text).input_ids[:2 * PRETRAINED]
    assert len(ids) == 2 * PRETRAINED
    return ids


def _saved(spec: RopeSpec, root, model: str = "default"):
    loaded = load(model)
    folder = root / spec.method
    extend(loaded.model, spec).save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("spec", METHODS, ids=lambda spec: spec.method)
def test_llamacpp_computes_the_exported_extension_as_transformers_does(spec, tokens, tmp_path):
    folder = _saved(spec, tmp_path)
    run_export(str(folder), str(tmp_path / "model.gguf"))
    for length in (PRETRAINED, 2 * PRETRAINED):
        assert largest_difference(tmp_path / "model.gguf", folder, tokens[:length]) < TOLERANCE, length


def test_an_export_with_yarns_attention_factor_dropped_fails_the_same_comparison(tokens, tmp_path):
    spec = METHODS[2]
    folder = _saved(spec, tmp_path)
    loaded = load(str(folder))
    rope = check_exportable(loaded.model.config)
    dropped = dataclasses.replace(rope, attn_factor=1 / llamacpp_mscale(rope.factor))
    write_gguf(loaded.model, loaded.tokenizer, json.loads((folder / "tokenizer.json").read_text()), dropped,
               tmp_path / "dropped.gguf")
    assert largest_difference(tmp_path / "dropped.gguf", folder, tokens) > 100 * TOLERANCE


@pytest.mark.slow
def test_smollm2_exported_with_yarn_runs_in_llamacpp_as_in_transformers(tmp_path):
    """SmolLM2-135M (pretrained to 8,192): one llama.cpp forward takes about 70 s at 8,192 tokens and 4.5 min at
    16,384 on two cores, per method (benchmarks/llamacpp_smollm2.py checks both), so CI checks yarn x2 at 1,024
    tokens, last position (10 s in all); the shipped model covers twice the pretrained length."""
    try:
        packaged_gguf_path("smollm2-135m")
    except RopescopeError as error:
        if REQUIRED:
            raise
        pytest.skip(str(error))
    folder = _saved(RopeSpec("yarn", factor=2.0, original_max_position_embeddings=8192), tmp_path, "smollm2-135m")
    run_export(str(folder), str(tmp_path / "smollm2.gguf"))
    ids = torch.randint(3, 49152, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    assert largest_difference(tmp_path / "smollm2.gguf", folder, ids, all_positions=False) < SMOLLM2_TOLERANCE
