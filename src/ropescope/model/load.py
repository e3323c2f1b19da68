"""The one way to load a model: every command, the study and the attention analyses go through `load`.

`resolve_model` (in `ropescope.model.resolve`) names the model; `ModelOptions` says where and how to load it
(device, dtype, accelerate's device map, attention implementation), checked once, when it is built; `load` returns
a `LoadedModel`: the network, its tokenizer and the labels every row it produces starts with.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_flash_attn_2_available

from ropescope.errors import RopescopeError
from ropescope.io.rows import RunLabels
from ropescope.model.patch import extend, pretrained_rope, spec_from_config
from ropescope.model.resolve import (
    ModelSource,
    causal_lm_class,
    first_line,
    pretrained_length_of,
    read_model_config,
    resolve_model,
)
from ropescope.rope import METHODS, RopeSpec, parse_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `--dtype auto` runs a model of at least this many parameters in bfloat16 on a CPU that multiplies it natively.
# Below it the matrix products are too small for bfloat16's speed to show (the shipped 1.4M-parameter model runs
# 1.4x faster, not SmolLM2's 1.6x: benchmarks/cpu_bfloat16.py), while its rounding changes the small model's
# results: the default study's numbers stay those of float32. A model whose every query's attention is captured
# (entropy profiles, attention against distance) stays in float32 under `auto`: bfloat16 moved SmolLM2's
# last-layer mean entropy by 0.033 nats over 2K tokens (tests/test_bfloat16.py), beyond the 0.02 its readouts allow.
CPU_BFLOAT16_MIN_PARAMETERS = 50_000_000
_LOG = logging.getLogger(__name__)
_WARNED: set[str] = set()


def load_tokenizer(model: str | Path | ModelSource = "default"):
    """The model's tokenizer alone (quick), to check inputs in tokens before the weights load."""
    source = resolve_model(model)
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as error:  # tokenizers and transformers raise many kinds for a damaged file
        raise RopescopeError(f"model {source.name!r}: its tokenizer in {str(source.path)!r} cannot be read: "
                             f"{type(error).__name__}: {first_line(error)}") from None



# ---------------------------------------------------------------------------------------------------------------
# Where and how to load it


def _device_of(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RopescopeError(f"device {name!r} is unknown; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RopescopeError(f"device {name!r}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RopescopeError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RopescopeError(f"device {name!r}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise RopescopeError(f"device {name!r} is unknown; accepted: auto, cpu, cuda, cuda:N, mps")
    return device


def cpuinfo_multiplies_bfloat16(cpuinfo: str) -> bool:
    """Whether the flags of a /proc/cpuinfo text name a native bfloat16 matrix product: AVX512-BF16 or AMX-BF16."""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@functools.cache
def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read once per process: from
    /proc/cpuinfo where there is one, else from the instruction set PyTorch dispatches to (AMX names it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return cpuinfo_multiplies_bfloat16(handle.read())
    except OSError:  # not Linux
        return "AMX" in torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class ModelOptions:
    """Where and how to load a model; checked on construction.

    device: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps. dtype: auto (bfloat16 on a
    GPU that supports it, and on a CPU that multiplies it natively for a model of at least
    CPU_BFLOAT16_MIN_PARAMETERS parameters; else float32), float32, bfloat16 or float16. device_map: accelerate's big-model
    dispatch (e.g. 'auto': layers spread over the GPUs, then CPU memory), which then decides placement instead of
    `device`. attn_implementation: None picks sdpa where the model class supports it, else eager.
    entropy_capture: the model is loaded for whole-sequence attention readouts (entropy profiles, attention
    against distance), which `auto` keeps in float32 on a CPU.
    """

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None
    entropy_capture: bool = False

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise RopescopeError(f"dtype {self.dtype!r} is unknown; accepted: auto, {', '.join(DTYPES)}")
        _device_of(self.device)  # refuses a device this machine lacks
        if self.attn_implementation == "flash_attention_2":
            if not is_flash_attn_2_available():
                raise RopescopeError("attn_implementation 'flash_attention_2' needs the flash-attn package and a "
                                     "CUDA GPU; use sdpa or eager")

    def torch_device(self) -> torch.device:
        return _device_of(self.device)

    def torch_dtype(self, parameters: int | None = None) -> torch.dtype:
        """The dtype to load in; `auto` on a CPU reads the model's `parameters` (None: float32)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.torch_device()
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if self.cpu_bfloat16_sized(parameters) and cpu_multiplies_bfloat16():
            return torch.bfloat16
        return torch.float32

    def cpu_bfloat16_sized(self, parameters: int | None) -> bool:
        """Whether `auto` runs a model of `parameters` in bfloat16 on this CPU where the CPU multiplies it natively
        (an evaluation, not a whole-sequence readout, of a model large enough for its speed to show)."""
        return (self.dtype == "auto" and self.torch_device().type == "cpu" and not self.device_map
                and not self.entropy_capture and parameters is not None
                and parameters >= CPU_BFLOAT16_MIN_PARAMETERS)


def _warn_slow_bfloat16(device: torch.device, dtype: torch.dtype) -> None:
    """Say once per process that bfloat16 asked for on a CPU without a native bfloat16 product runs emulated."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_multiplies_bfloat16() and "cpu" not in _WARNED:
        _WARNED.add("cpu")
        _LOG.warning("bfloat16 on this CPU (no AVX512-BF16 or AMX) is emulated: slower than float32, same results")


def float32_for_want_of_bfloat16(model: str | Path | ModelSource = "default",
                                 options: ModelOptions | None = None) -> bool:
    """Whether `auto` loads `model` in float32 on this CPU only because the CPU has no native bfloat16 product: a
    model that a CPU with AVX512-BF16 or AMX evaluates in bfloat16, about ten times faster (SmolLM2's 16K-token
    perplexity: 268 s against 28 s)."""
    options = options or ModelOptions(device="cpu")
    if cpu_multiplies_bfloat16():
        return False
    return options.cpu_bfloat16_sized(_parameter_count(read_model_config(resolve_model(model))))


def model_dtype(model: str | Path | ModelSource = "default", options: ModelOptions | None = None) -> str:
    """The dtype `load(model, options=options)` loads in, as rows name it ('float32', 'bfloat16'), without
    loading the weights (the config on the meta device gives the parameter count)."""
    options = options or ModelOptions()
    return _dtype_name(options.torch_dtype(_parameter_count(read_model_config(resolve_model(model)))))


@dataclass
class LoadedModel:
    """A model ready to evaluate, its tokenizer, and the labels every row it produces starts with."""

    model: torch.nn.Module
    tokenizer: Any
    labels: RunLabels


def load(model: str | Path | ModelSource = "default", spec: RopeSpec | None = None,
         options: ModelOptions | None = None) -> LoadedModel:
    """Load `model` in eval mode, extended with `spec` (None or the 'default' method: the model as trained; a
    checkpoint saved after `extend` comes back with its recorded extension)."""
    options = options or ModelOptions()
    source = resolve_model(model)
    config = read_model_config(source)
    tokenizer = load_tokenizer(source)
    parameters = _check_weights_fit(source, config)
    device, dtype = options.torch_device(), options.torch_dtype(parameters)
    _warn_slow_bfloat16(device, dtype)
    attn_implementation = options.attn_implementation or (
        "sdpa" if getattr(causal_lm_class(config), "_supports_sdpa", False) else "eager")
    placement = {"device_map": options.device_map} if options.device_map else {}
    try:
        network = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                       attn_implementation=attn_implementation, **placement)
    except (OSError, SafetensorError) as error:  # weights missing or damaged (ValueErrors are ours to see)
        raise RopescopeError(f"model {source.name!r}: its weights in {str(source.path)!r} cannot be read: "
                             f"{first_line(error)}") from None
    if not options.device_map:
        network = network.to(device)
    network.eval()
    if spec is not None and spec.method == "default" and spec.logit_scale is None:
        spec = None  # the model as trained (a scaled original keeps its spec: its logits change)
    # a checkpoint saved after `extend` gets its recorded extension back through ropescope's rotary module, so
    # that dynamic methods follow the current length exactly
    applied = spec or spec_from_config(network.config)
    if applied is not None:
        extend(network, applied)
    return LoadedModel(network, tokenizer, _labels(source, network, applied))


def _labels(source: ModelSource, network: torch.nn.Module, applied: RopeSpec | None) -> RunLabels:
    """The labels of a loaded model: what it is, where it runs and the extension it carries."""
    params = applied.params if applied is not None else {}
    parameter = next(network.parameters())
    return RunLabels(
        model=source.name, revision=source.revision, device=str(parameter.device), dtype=_dtype_name(parameter.dtype),
        method=applied.method if applied is not None else "default", factor=params.get("factor"),
        original_max_position_embeddings=params.get("original_max_position_embeddings")
        or pretrained_rope(network.config)[1], rope=applied.to_text() if applied is not None else "default",
    )


def _check_weights_fit(source: ModelSource, config) -> int:
    """Refuse, in one line, weights whose shapes differ from what the config builds (transformers would print a
    load report and raise from deep inside); compared on a meta-device model, so nothing is allocated. Returns
    the model's parameter count (tied weights once)."""
    with torch.device("meta"):
        network = causal_lm_class(config)(config)
    expected = {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}
    for weights in sorted(source.path.glob("*.safetensors")):
        with safe_open(weights, "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise RopescopeError(
                        f"model {source.name!r}: weight {name!r} in {weights.name} has shape {list(shape)}, but "
                        f"its config.json builds {list(expected[name])}; the config does not fit the weights")
    return sum(parameter.numel() for parameter in network.parameters())


def _parameter_count(config) -> int:
    """The parameters the config builds, tied weights counted once; on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in causal_lm_class(config)(config).parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def extension_specs(model: str | Path | ModelSource, methods: Iterable, factor: float | None = None,
                    original_max_position_embeddings: int | None = None) -> list[RopeSpec]:
    """The specs of `methods`, each read by `rope.parse_spec` (a RopeSpec, or named as `NAME[:key=value,...]`),
    with `factor` and the original length (default: the model's pretrained length) filled in where a method
    takes them."""
    methods = list(methods)
    pretrained_length = original_max_position_embeddings
    if pretrained_length is None and any(not isinstance(method, RopeSpec) for method in methods):
        pretrained_length = pretrained_length_of(model)
    specs = [parse_spec(method, factor, pretrained_length) for method in methods]
    if factor is not None and not any("factor" in METHODS[spec.method].params for spec in specs):
        raise RopescopeError(f"factor {factor:g} is given but no method takes one; add e.g. --method yarn")
    return specs
