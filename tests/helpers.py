"""Helpers the test modules share: tiny tokenizers and models built offline in a second, and small fixtures.

- `tiny_tokenizer`, `tiny_llama`, `tiny_folders`, `DOCUMENTS`: a byte-level BPE tokenizer trained on the passkey
  format and some prose, a tiny random Llama, and the two saved as folders (for the evaluation tests);
- `tiny_model`, `eager_entropies`, `VOCAB`: tiny random Llama / Mistral / Qwen2 models and the attention entropy
  of transformers' own eager attention (for the attention tests).
"""

from __future__ import annotations

import functools
import math
import os
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ropescope.errors import RopescopeError
from ropescope.model.gguf import packaged_gguf_path
from ropescope.model.load import ModelOptions, load
from ropescope.model.resolve import resolve_model
from ropescope.tasks.passkey import FILLER, KEY_LINE, QUESTION
from ropescope.study.run.store import ResultStore

PROSE = (
    "It was the best of times, it was the worst of times. The king walked slowly through the garden, "
    "and the queen followed him with a lantern. Rain fell on the old stone walls of the castle all night. "
    "What light through yonder window breaks? It is the east, and the sun is rising over the hills. "
    "The secret ingredient of the pie is a spoonful of honey, said the baker to the curious boy.\n\n"
)

DOCUMENTS = [
    PROSE * 3,
    (PROSE.replace("king", "duke").replace("queen", "duchess")) * 6,
    PROSE[::-1].replace(".", ". ") * 2,
]


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocabulary about 400) trained on the passkey format and some prose."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [FILLER * 4, KEY_LINE.format(key=48213) + " " + QUESTION, *DOCUMENTS]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0, max_position_embeddings: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def tiny_folders(root, max_position_embeddings: int):
    """`root/model` (a tiny saved Llama with its tokenizer) and `root/corpus` (the documents as .txt files)."""
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), max_position_embeddings=max_position_embeddings).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus").mkdir()
    for index, text in enumerate(DOCUMENTS):
        (root / "corpus" / f"doc{index}.txt").write_text(text)
    return root


# Tiny random Llama / Mistral / Qwen2 models for the attention tests (no downloads).

VOCAB = 100
SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256,
    initializer_range=0.2,  # large enough for peaked, position-dependent attention (0.02 gives near-uniform)
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    # A window shorter than the test inputs, so the sliding-window path is exercised.
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
    # Layer 0 full attention, layer 1 sliding.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
}


def tiny_model(family: str = "llama", attn_implementation: str = "sdpa", seed: int = 0):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**SIZES, **extra)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


def packaged_or_skip(name: str):
    """The GGUF file of a packaged model; the test skips where its package is not installed, except where
    ROPESCOPE_REQUIRE_REAL_MODEL=1 (CI) makes that a failure."""
    try:
        return packaged_gguf_path(name)
    except RopescopeError as error:
        if os.environ.get("ROPESCOPE_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(str(error))


def packaged_in_float32(name: str):
    """(model in float32 on the CPU, tokenizer, converted folder) of a packaged model; asked for explicitly, since
    `auto` runs a model of its size in bfloat16 on a CPU that multiplies it natively, and the real-model tests
    compare at float32 tolerances."""
    loaded = load(name, options=ModelOptions(device="cpu", dtype="float32"))
    return loaded.model, loaded.tokenizer, resolve_model(name).path


def against_gguf_loading(model, tokenizer, gguf_file, text: str = "The capital of France is"):
    """(ids, our logits, transformers' own) for `text`: ropescope's converted model against transformers loading the
    GGUF file itself, in float32, after checking that both tokenizers give the same ids."""
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        return ids, model(ids).logits, reference(ids).logits


def eager_entropies(model, input_ids) -> torch.Tensor:
    """Entropy from transformers' own eager attention weights: [layers, batch, heads, seq], float64."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    weights = torch.stack(attentions).double()
    return -torch.where(weights > 0, weights * weights.log(), 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# A small results database for the report and findings tests

STUDY_VARIANTS = [("original", "original", "default", None), ("yarn@512", "yarn", "yarn", 512),
                  ("yarn@1024", "yarn", "yarn", 1024), ("pi@512", "pi", "linear", 512), ("pi@1024", "pi", "linear", 1024)]
PPL_LENGTHS = (256, 512, 1024, 2048, 4096)
PASSKEY_LENGTHS = (256, 512, 1024, 2048)


def labels(variant, method_name, method, train_length, train_seed=None):
    row = {"variant": variant, "method_name": method_name, "method": method, "train_length": train_length,
           "factor": None if method == "default" else 4.0}
    return row if train_seed is None else {**row, "train_seed": train_seed}


def fill_store(path, meta_key="original_max_position_embeddings", untrained=None, seeds=1):
    """A plausible small study: the original fails past 256, longer training helps, and within a length and variant
    failed retrievals have the higher entropy. `untrained` replaces the original's train_length (old rows: 0);
    `seeds`: fine-tunes per (method, length), each run a little better or worse than the others."""
    rng = random.Random(0)
    documents = [rng.uniform(-0.3, 0.3) for _ in range(6)]  # each document's own difficulty, centred below
    documents = [offset - sum(documents) / len(documents) for offset in documents]
    variants = [(f"{variant}-s{seed}" if seed else variant, method_name, method, train_length, seed)
                for variant, method_name, method, train_length in STUDY_VARIANTS
                for seed in (range(seeds) if train_length else [None])]
    with ResultStore(path) as store:
        store.set_meta(meta_key, 256)
        for variant, method_name, method, train_length, seed in variants:
            base = labels(variant, method_name, method, train_length or untrained, seed)
            run = 0.02 * (seed - (seeds - 1) / 2) if seed is not None else 0.0  # the run's own luck
            quality = 0 if method == "default" else train_length / 1024 + run  # 0..1
            ppl = []
            for n in PPL_LENGTHS:
                level = math.log(20 * (n / 256) ** (1 - 0.8 * quality) if n > 256 else 20.0)
                nll = [level + offset for offset in documents]
                ppl.append({**base, "protocol": "truncated", "length": n, "document_nll": nll,
                            "perplexity": math.exp(sum(nll) / len(nll))})
            store.record(f"perplexity/{variant}", "perplexity", variant, "h", ppl, 1.0)
            passkey, uncertainty = [], []
            for n in PASSKEY_LENGTHS:
                for depth in (0.0, 50.0, 100.0):
                    for trial in range(4):
                        correct = n == 256 or rng.random() < quality * 512 / n
                        passkey.append({**base, "length": n, "depth_percent": depth, "trial": trial,
                                        "score": float(correct)})
                        uncertainty.append({**base, "length": n, "depth_percent": depth, "trial": trial,
                                            "correct": correct, "needle_mass": 0.1,
                                            "entropy": math.log(n) / 2 + (0 if correct else 0.3)
                                            + rng.uniform(-0.3, 0.3)})
            store.record(f"passkey/{variant}", "passkey", variant, "h", passkey, 1.0)
            store.record(f"uncertainty/{variant}", "uncertainty", variant, "h", uncertainty, 1.0)
            entropy = []
            for n in (256, 1024):
                for layer in range(2):
                    for p in range(16, n, 64):
                        value = math.log(p + 1) * (1 - quality / 3)
                        entropy.append({**base, "length": n, "layer": layer, "position": p, "entropy": value,
                                        "head_sample_entropy": [value - 0.05, value, value + 0.05]})
            store.record(f"entropy/{variant}", "entropy", variant, "h", entropy, 1.0)
            patterns = [{**base, "row_type": "preservation", "layer": layer, "js_divergence": 0.3 - 0.25 * quality}
                        for layer in range(2)]
            patterns += [{**base, "row_type": "distribution", "length": n, "layer": 0, "distance_bin": b,
                          "distance_start": 2 ** b / (n / 256), "mass": 2.0 ** -b}
                         for n in (256, 1024) for b in range(8)]
            store.record(f"patterns/{variant}", "patterns", variant, "h", patterns, 1.0)
        store.record_failure("passkey/broken", "passkey", "broken", "h", "Traceback...\nValueError: boom", 0.5)


# A study on the shipped model that runs every stage in a few seconds (lock and fault tests run it in subprocesses).
TINY_STUDY = """
seed = 0
[model]
path = "default"
original_max_position_embeddings = 256
[corpus]
path = "default"
[methods.original]
method = "default"
[methods.yarn]
method = "yarn"
factor = 2.0
[training]
lengths = [512]
steps = 1
tokens_per_step = 512
warmup_steps = 1
include_untrained = false
[evaluation]
perplexity_lengths = [256]
perplexity_documents = 1
[retrieval]
lengths = [256]
depths = [50]
trials = 1
[analysis]
entropy_lengths = [256]
entropy_samples = 1
pattern_length = 256
"""


def study_command(config_path, out, *extra) -> list[str]:
    """`ropescope study CONFIG --out OUT ...` as a subprocess command line, on one thread."""
    import sys

    return [sys.executable, "-m", "ropescope", "study", str(config_path), "--out", str(out), *map(str, extra)]
