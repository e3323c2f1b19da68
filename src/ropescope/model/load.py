"""The one way to name and load a model: every command, the study and the attention analyses go through here.

A model is named as `default` (the shipped model), a local Hugging Face folder, a GGUF file (`*.gguf`, or a short
name of a packaged one such as `smollm2-135m`: see `ropescope.model.gguf`), or a Hub repo id `org/name[@revision]`,
which huggingface_hub resolves from its local cache when offline (`HF_HUB_OFFLINE=1`) and downloads otherwise. `ModelOptions` says where and how to load it (device, dtype, accelerate's device map,
attention implementation); it is checked once, when it is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropescope.model import gguf as gguf_files
from ropescope.errors import RopescopeError
from ropescope.rope import RopeSpec
from ropescope.io.rows import RunLabels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Examples for the refusal message; support follows from the config (a causal LM with rope_parameters), not this list.
ROTARY_EXAMPLES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                   "gemma3_text", "phi3", "stablelm", "olmo2", "granite", "cohere", "smollm3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Hub files never needed to load a transformers checkpoint (original consolidated weights, other frameworks).
SKIPPED_HUB_FILES = ["original/*", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.tflite"]


def default_model_path() -> Path:
    """The folder of the shipped model (a small Llama pretrained at 256 tokens), in Hugging Face format."""
    return Path(__file__).parent.parent / "default" / "model"


# ---------------------------------------------------------------------------------------------------------------
# Naming a model


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it, resolved to a local folder.

    name: 'default', the folder or GGUF file as given, a packaged GGUF's short name, or the Hub repo id (without
    @revision); revision: the Hub commit of the snapshot, or for a GGUF file its quantisation and content hash
    (None for local folders). path: the folder transformers loads (a GGUF file's converted folder).
    """

    name: str
    path: Path
    revision: str | None = None


def resolve_model(model: str | Path) -> ModelSource:
    """`default`, a local folder (with config.json and a tokenizer), a GGUF file or a packaged GGUF's short name,
    or a Hub id `org/name[@revision]`."""
    text = str(model)
    if text == "default":
        source = ModelSource("default", default_model_path())
    elif gguf_files.is_gguf_name(text) and not Path(text).is_dir():
        file = gguf_files.packaged_gguf_path(text) if text in gguf_files.PACKAGED else Path(text)
        converted = gguf_files.converted_folder(file)
        source = ModelSource(text, converted.folder, converted.revision)
    elif Path(text).is_dir() or not HUB_ID.match(text):
        source = ModelSource(text, Path(text))
    else:
        source = _hub_snapshot(text)
    path = source.path
    if not path.is_dir():
        raise RopescopeError(
            f"model {text!r} is not a folder; give 'default', a local Hugging Face model folder, a .gguf file, "
            f"{', '.join(repr(name) for name in gguf_files.PACKAGED)} or a Hub id org/name[@revision]"
        )
    if not (path / "config.json").is_file():
        raise RopescopeError(f"model folder {str(path)!r} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RopescopeError(f"model folder {str(path)!r} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    _check_readable(path)
    return source


def _check_readable(path: Path) -> None:
    """Refuse a damaged folder before anything loads: config.json must be a JSON object and every safetensors
    weight file must have a whole header covering the file (a truncated file fails here, in milliseconds)."""
    import json

    from safetensors import SafetensorError, safe_open

    config = path / "config.json"
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RopescopeError(f"model file {str(config)!r} cannot be read: {_first_line(error)}") from None
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):
                pass
        except (OSError, SafetensorError) as error:
            raise RopescopeError(f"model file {str(weights)!r} cannot be read (damaged or truncated?): "
                                 f"{_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve_model_path(model: str | Path) -> Path:
    """The local folder of `model` (see `resolve_model`)."""
    return resolve_model(model).path


def _hub_snapshot(text: str) -> ModelSource:
    """The local snapshot of a Hub repo: from the cache when offline, downloaded (transformers files only) when
    online. Its folder name is the commit hash, recorded as the revision."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = text.partition("@")
    revision = revision or None
    try:
        folder = snapshot_download(repo_id, revision=revision, ignore_patterns=SKIPPED_HUB_FILES,
                                   local_files_only=constants.HF_HUB_OFFLINE)
    except LocalEntryNotFoundError:
        fetch = f"download {repo_id}{f' --revision {revision}' if revision else ''}"
        raise RopescopeError(
            f"model {text!r} is no local folder and not in the Hugging Face cache, and the Hub is offline or "
            f"unreachable; fetch it with `hf {fetch}` (or `huggingface-cli {fetch}`) where there is network, or "
            "unset HF_HUB_OFFLINE"
        ) from None
    except Exception as error:  # repository not found, gated, no network: one line naming the id
        raise RopescopeError(f"model {text!r} is no local folder and could not be fetched from the Hugging Face Hub: "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    folder = Path(folder)
    return ModelSource(repo_id, folder, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision)


def load_config(model: str | Path | ModelSource):
    """The transformers config of a causal LM with rotary position embeddings (anything else is refused)."""
    from transformers import AutoConfig

    source = model if isinstance(model, ModelSource) else resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError, KeyError) as error:
        raise RopescopeError(f"model {source.name!r}: transformers cannot read its config: "
                             f"{_first_line(error)}") from None
    if _causal_lm_class(config) is None or not getattr(config.get_text_config(), "rope_parameters", None):
        raise RopescopeError(
            f"model {source.name!r} is a {config.model_type!r} model, not a causal LM with rotary position "
            f"embeddings; accepted: a model type with a causal-LM class in transformers and rope_parameters in its "
            f"config, as {', '.join(ROTARY_EXAMPLES)} and their kin"
        )
    return config


def _causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def original_max_position_embeddings_of(model: str | Path | ModelSource) -> int:
    """The context length the model was pretrained at (before any extension recorded in its config)."""
    from ropescope.model.patch import pretrained_rope

    return pretrained_rope(load_config(model))[1]


def load_tokenizer(model: str | Path | ModelSource = "default"):
    """The model's tokenizer alone (quick), to check inputs in tokens before the weights load."""
    from transformers import AutoTokenizer

    source = model if isinstance(model, ModelSource) else resolve_model(model)
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as error:  # tokenizers and transformers raise many kinds for a damaged file
        raise RopescopeError(f"model {source.name!r}: its tokenizer in {str(source.path)!r} cannot be read: "
                             f"{type(error).__name__}: {_first_line(error)}") from None


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


@dataclass(frozen=True)
class ModelOptions:
    """Where and how to load a model; checked on construction.

    device: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps. dtype: auto (bfloat16 on a
    GPU that supports it, else float32), float32, bfloat16 or float16. device_map: accelerate's big-model
    dispatch (e.g. 'auto': layers spread over the GPUs, then CPU memory), which then decides placement instead of
    `device`. attn_implementation: None picks sdpa where the model class supports it, else eager.
    """

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise RopescopeError(f"dtype {self.dtype!r} is unknown; accepted: auto, {', '.join(DTYPES)}")
        _device_of(self.device)  # refuses a device this machine lacks
        if self.attn_implementation == "flash_attention_2":
            from transformers.utils import is_flash_attn_2_available

            if not is_flash_attn_2_available():
                raise RopescopeError("attn_implementation 'flash_attention_2' needs the flash-attn package and a "
                                     "CUDA GPU; use sdpa or eager")

    def torch_device(self) -> torch.device:
        return _device_of(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.torch_device()
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32


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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from ropescope.model.patch import extend, pretrained_rope, spec_from_config

    options = options or ModelOptions()
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config = load_config(source)
    tokenizer = load_tokenizer(source)
    device, dtype = options.torch_device(), options.torch_dtype()
    attn_implementation = options.attn_implementation or (
        "sdpa" if getattr(_causal_lm_class(config), "_supports_sdpa", False) else "eager")
    placement = {"device_map": options.device_map} if options.device_map else {}
    _check_weights_fit(source, config)
    try:
        network = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                       attn_implementation=attn_implementation, **placement)
    except (OSError, SafetensorError) as error:  # weights missing or damaged (ValueErrors are ours to see)
        raise RopescopeError(f"model {source.name!r}: its weights in {str(source.path)!r} cannot be read: "
                             f"{_first_line(error)}") from None
    if not options.device_map:
        network = network.to(device)
    network.eval()
    if spec is not None and spec.method == "default":
        spec = None
    # a checkpoint saved after `extend` gets its recorded extension back through ropescope's rotary module, so
    # that dynamic methods follow the current length exactly
    applied = spec or spec_from_config(network.config)
    if applied is not None:
        extend(network, applied)
    params = applied.params if applied is not None else {}
    parameter = next(network.parameters())
    labels = RunLabels(
        model=source.name, revision=source.revision, device=str(parameter.device), dtype=_dtype_name(parameter.dtype),
        method=applied.method if applied is not None else "default", factor=params.get("factor"),
        original_max_position_embeddings=params.get("original_max_position_embeddings")
        or pretrained_rope(network.config)[1], rope=applied.to_text() if applied is not None else "default",
    )
    return LoadedModel(network, tokenizer, labels)


def _check_weights_fit(source: ModelSource, config) -> None:
    """Refuse, in one line, weights whose shapes differ from what the config builds (transformers would print a
    load report and raise from deep inside); compared on a meta-device model, so nothing is allocated."""
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {name: tuple(tensor.shape)
                    for name, tensor in _causal_lm_class(config)(config).state_dict().items()}
    for weights in sorted(source.path.glob("*.safetensors")):
        with safe_open(weights, "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise RopescopeError(
                        f"model {source.name!r}: weight {name!r} in {weights.name} has shape {list(shape)}, but "
                        f"its config.json builds {list(expected[name])}; the config does not fit the weights")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_model(model: str | Path = "default", spec: RopeSpec | None = None, *, device: str = "auto",
               dtype: str | torch.dtype = "auto", device_map: str | None = None,
               attn_implementation: str | None = None):
    """`(model, tokenizer)`: `model` loaded in eval mode, extended with `spec` if one is given (see `load`)."""
    if isinstance(dtype, torch.dtype):
        dtype = _dtype_name(dtype)
    loaded = load(model, spec, ModelOptions(str(device), dtype, device_map, attn_implementation))
    return loaded.model, loaded.tokenizer



def extension_specs(model: str | Path | ModelSource, methods, factor: float | None = None,
                    original_max_position_embeddings: int | None = None) -> list[RopeSpec]:
    """The specs of `methods`, each a `RopeSpec` or named as `NAME[:key=value,...]` (`rope.method_spec`), with
    `factor` and the original length (default: the model's own) filled in where a method takes them."""
    from ropescope.rope import METHODS, method_spec

    original = original_max_position_embeddings
    if original is None and any(not isinstance(method, RopeSpec) for method in methods):
        original = original_max_position_embeddings_of(model)
    specs = [method if isinstance(method, RopeSpec) else method_spec(method, factor, original) for method in methods]
    if factor is not None and not any("factor" in METHODS[spec.method].params for spec in specs):
        raise RopescopeError(f"factor {factor:g} is given but no method takes one; add e.g. --method yarn")
    return specs
