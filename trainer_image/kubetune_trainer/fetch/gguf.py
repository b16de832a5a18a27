"""GGUF base models: detect a GGUF file, record its digest, dequantise it to a training checkpoint.

A FineTuneJob may name a ``*.gguf`` file — or a folder that holds exactly one and no
``config.json`` — as ``model.base.uri``, from any store the fetch stage reads. GGUF weights are
quantised for inference (Q4_1, Q8_0, ...) and cannot be trained directly; transformers reads the
file (tokenizer, chat template and config included), dequantises every tensor, and
:func:`dequantize_gguf` saves the result as a plain safetensors folder in the training precision.
That folder is what the trainer then loads, exactly as it loads any other base model.

Input: a fetched local path. Output: a :class:`GgufBase` (where the dequantised folder is, the
GGUF file's sha256 for lineage, its architecture and quantisation type, and a one-line
:meth:`GgufBase.describe` for the log and the model card).

Raises :class:`GgufError` for a folder with several GGUF files, a file that is not GGUF, and an
architecture that transformers cannot load from GGUF (the message names the architecture and lists
those it can). Conversions are cached under ``cache_dir`` keyed on the file's sha256, the target
precision and the transformers version, so a second run with the same file converts nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from kubetune_registry.digests import sha256_file

GGUF_MAGIC = b"GGUF"
CONVERSION_RECORD = "kubetune-gguf.json"
"""Written into every dequantised folder: where it came from (file, sha256, architecture, type)."""

# transformers' own names for llama.cpp architectures it maps under another name
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint).
_ARCHITECTURE_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}
# Keys of transformers' GGUF mapping that are metadata sections, not architectures.
_NOT_ARCHITECTURES = frozenset({"general", "tokenizer"})
_PRECISION_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


class GgufError(Exception):
    """A GGUF base model cannot be used; the message names the file and what the user can do."""


@dataclass(frozen=True)
class GgufBase:
    """A GGUF base model dequantised into a trainable folder."""

    model_dir: Path
    gguf_file: str  # file name, as fetched
    sha256: str
    architecture: str
    file_type: str  # e.g. "MOSTLY_Q4_1", from general.file_type
    dtype: str  # the precision it was dequantised to ("float32", "bfloat16")
    transformers_version: str
    cached: bool = False

    def describe(self) -> str:
        """One line for the log and the model card."""
        return (
            f"GGUF base {self.gguf_file} (sha256 {self.sha256[:12]}…, {self.architecture}, "
            f"{self.file_type}) dequantised to {self.dtype} by transformers {self.transformers_version}"
        )

    def lineage(self) -> dict[str, str]:
        """What lineage records about the GGUF file (the digest is of the file itself)."""
        return {
            "file": self.gguf_file,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "fileType": self.file_type,
            "dequantizedTo": self.dtype,
            "transformers": self.transformers_version,
        }


def is_gguf_file(path: Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf(path: Path) -> Path | None:
    """The GGUF file a fetched base model is, or None when it is not a GGUF base.

    A file is a GGUF base when it starts with the GGUF magic; a folder is when it holds exactly one
    ``*.gguf`` file and no ``config.json`` (a folder with a config is a transformers checkpoint,
    whatever else it ships). Raises GgufError for a ``.gguf`` file without the magic and for a folder
    with more than one GGUF file (name the file in ``model.base.uri``).
    """
    path = Path(path)
    if path.is_file():
        if is_gguf_file(path):
            return path
        if path.suffix.lower() == ".gguf":
            raise GgufError(f"{path.name}: named .gguf but is not a GGUF file (no GGUF magic bytes)")
        return None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    candidates = sorted(p for p in path.rglob("*.gguf") if p.is_file())
    if not candidates:
        return None
    if len(candidates) > 1:
        names = ", ".join(p.relative_to(path).as_posix() for p in candidates)
        raise GgufError(
            f"{path}: holds {len(candidates)} GGUF files ({names}); name one file in model.base.uri"
        )
    if not is_gguf_file(candidates[0]):
        raise GgufError(f"{candidates[0].name}: named .gguf but is not a GGUF file (no GGUF magic bytes)")
    return candidates[0]


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item() if field.data else None


def read_gguf_header(path: Path) -> dict[str, Any]:
    """``{"architecture", "name", "file_type"}`` from a GGUF file's metadata (tensors are not read)."""
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError) as exc:
        raise GgufError(f"{Path(path).name}: not a readable GGUF file ({exc})") from None
    architecture = _field_value(reader, "general.architecture")
    if not architecture:
        raise GgufError(f"{Path(path).name}: GGUF metadata has no general.architecture")
    file_type = _field_value(reader, "general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else "unknown"
    except ValueError:
        file_type_name = f"type {file_type}"
    return {
        "architecture": str(architecture),
        "name": _field_value(reader, "general.name"),
        "file_type": file_type_name,
    }


def supported_architectures() -> list[str]:
    """The llama.cpp architectures this transformers can load from GGUF."""
    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES)


def check_architecture(architecture: str, file_name: str) -> None:
    """Raise GgufError naming ``architecture`` when transformers cannot load it from GGUF."""
    supported = supported_architectures()
    if architecture in supported or _ARCHITECTURE_ALIASES.get(architecture) in supported:
        return
    raise GgufError(
        f"{file_name}: GGUF architecture {architecture!r} cannot be loaded by transformers "
        f"(it reads {', '.join(supported)}); convert the model to safetensors and point model.base.uri "
        "at that folder"
    )


def _torch_dtype(precision: str) -> str:
    try:
        return _PRECISION_DTYPES[precision]
    except KeyError:
        raise GgufError(
            f"training.precision {precision}: GGUF bases are dequantised to fp32 or bf16 for training"
        ) from None


def dequantize_gguf(
    gguf_file: Path, out_dir: Path, *, precision: str = "fp32", sha256: str | None = None
) -> GgufBase:
    """Dequantise ``gguf_file`` with transformers and save it to ``out_dir`` as a safetensors folder.

    The folder gets the model (``precision``: fp32 or bf16), the tokenizer with its chat template,
    and :data:`CONVERSION_RECORD`. Written beside ``out_dir`` and renamed into place, so a reader
    never sees half a folder. Raises GgufError (unsupported architecture or precision, unreadable
    file, or transformers refusing the file).
    """
    gguf_file = Path(gguf_file)
    header = read_gguf_header(gguf_file)
    check_architecture(header["architecture"], gguf_file.name)
    dtype_name = _torch_dtype(precision)
    digest = sha256 or sha256_file(gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=getattr(torch, dtype_name)
        )
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise GgufError(
            f"{gguf_file.name}: transformers could not load this {header['architecture']} GGUF file ({exc})"
        ) from None
    # The loaded model remembers it came from a quantised file; a plain checkpoint must not.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute by torch)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    base = GgufBase(
        model_dir=out_dir,
        gguf_file=gguf_file.name,
        sha256=digest,
        architecture=header["architecture"],
        file_type=header["file_type"],
        dtype=dtype_name,
        transformers_version=transformers.__version__,
    )
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {k: v for k, v in asdict(base).items() if k not in ("model_dir", "cached")}
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return base


def _read_record(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / CONVERSION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_gguf_base(
    gguf_file: Path, work_dir: Path, *, precision: str = "fp32", cache_dir: Path | None = None
) -> GgufBase:
    """Dequantise ``gguf_file`` for training, reusing a cached conversion of the same bytes.

    Without ``cache_dir`` the folder lands in ``work_dir/gguf-dequantized``. With it, the folder is
    ``cache_dir/<sha256>-<dtype>-transformers<version>`` and is reused when its record matches (the
    returned GgufBase then has ``cached=True``). Raises GgufError as :func:`dequantize_gguf`.
    """
    gguf_file = Path(gguf_file)
    header = read_gguf_header(gguf_file)
    check_architecture(header["architecture"], gguf_file.name)
    dtype_name = _torch_dtype(precision)
    digest = sha256_file(gguf_file)
    if cache_dir is None:
        return dequantize_gguf(
            gguf_file, Path(work_dir) / "gguf-dequantized", precision=precision, sha256=digest
        )
    target = Path(cache_dir) / f"{digest}-{dtype_name}-transformers{transformers.__version__}"
    record = _read_record(target)
    if record and record.get("sha256") == digest and record.get("dtype") == dtype_name:
        return GgufBase(model_dir=target, cached=True, **record)
    return dequantize_gguf(gguf_file, target, precision=precision, sha256=digest)
