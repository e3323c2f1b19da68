"""The one way to name a model and read its config: `resolve_model` and `read_model_config`.

A model is named as `default` (the shipped model), a local Hugging Face folder, a GGUF file (`*.gguf`, or a short
name of a packaged one such as `smollm2-135m`: see `ropescope.model.gguf`), or a Hub repo id `org/name[@revision]`,
which huggingface_hub resolves from its local cache when offline (`HF_HUB_OFFLINE=1`) and downloads otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ropescope.errors import RopescopeError
from ropescope.model import gguf
from ropescope.model.patch import pretrained_rope

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


def resolve_model(model: str | Path | ModelSource) -> ModelSource:
    """`default`, a local folder (with config.json and a tokenizer), a GGUF file or a packaged GGUF's short name,
    or a Hub id `org/name[@revision]`; a ModelSource is returned as it is."""
    if isinstance(model, ModelSource):
        return model
    text = str(model)
    if text == "default":
        source = ModelSource("default", default_model_path())
    elif gguf.is_gguf_name(text) and not Path(text).is_dir():
        file = gguf.packaged_gguf_path(text) if text in gguf.PACKAGED else Path(text)
        converted = gguf.converted_folder(file)
        source = ModelSource(text, converted.folder, converted.revision)
    elif Path(text).is_dir() or not HUB_ID.match(text):
        source = ModelSource(text, Path(text))
    else:
        source = _hub_snapshot(text)
    path = source.path
    if not path.is_dir():
        raise RopescopeError(
            f"model {text!r} is not a folder; give 'default', a local Hugging Face model folder, a .gguf file, "
            f"{', '.join(repr(name) for name in gguf.PACKAGED)} or a Hub id org/name[@revision]"
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
    config = path / "config.json"
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RopescopeError(f"model file {str(config)!r} cannot be read: {first_line(error)}") from None
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):
                pass
        except (OSError, SafetensorError) as error:
            raise RopescopeError(f"model file {str(weights)!r} cannot be read (damaged or truncated?): "
                                 f"{first_line(error)}") from None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line refusals."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_snapshot(text: str) -> ModelSource:
    """The local snapshot of a Hub repo: from the cache when offline, downloaded (transformers files only) when
    online. Its folder name is the commit hash, recorded as the revision."""
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


def read_model_config(model: str | Path | ModelSource, *, config_only: bool = False):
    """The transformers config of a causal LM with rotary position embeddings (anything else is refused).

    config_only: read the config and nothing else, as `ropescope plan` does: a GGUF file's from its header
    (its weights are not converted), a Hub id's from the cache or the Hub without its weights.
    """
    if config_only and not isinstance(model, ModelSource):
        name, config = str(model), _config_alone(str(model))
    else:
        source = resolve_model(model)
        name = source.name
        try:
            config = AutoConfig.from_pretrained(source.path)
        except (OSError, ValueError, KeyError) as error:
            raise RopescopeError(f"model {name!r}: transformers cannot read its config: {first_line(error)}") from None
    if causal_lm_class(config) is None or not getattr(config.get_text_config(), "rope_parameters", None):
        raise RopescopeError(
            f"model {name!r} is a {config.model_type!r} model, not a causal LM with rotary position "
            f"embeddings; accepted: a model type with a causal-LM class in transformers and rope_parameters in its "
            f"config, as {', '.join(ROTARY_EXAMPLES)} and their kin"
        )
    return config


def _config_alone(model: str):
    """The config of `model` read without its weights; one line when it cannot be read."""
    if model in gguf.PACKAGED:
        path = gguf.packaged_gguf_path(model)  # says how to fetch it when it is not installed
    else:
        path = default_model_path() if model == "default" else Path(model)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise OSError(f"no such file {str(path)!r}")
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(str(path) if path.exists() else model)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for an unreadable config
        text = str(error).strip().splitlines()
        raise RopescopeError(f"model {model!r}: cannot read its config ({text[0] if text else type(error).__name__}); "
                             "give 'default', a model folder, a Hub id or a .gguf file") from None


def causal_lm_class(config):
    """The transformers causal-LM class of a config, or None."""
    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)


def pretrained_length_of(model: str | Path | ModelSource) -> int:
    """The context length the model was pretrained at (before any extension recorded in its config)."""
    return pretrained_rope(read_model_config(model))[1]
