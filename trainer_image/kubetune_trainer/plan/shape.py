"""A base model's shape from its config alone: ``config.json`` or a GGUF file's header.

:class:`ModelShape` is what the memory and time estimates need — layers, hidden and MLP widths,
attention heads, vocabulary, tied embeddings and the parameter count — read without a single
weight: :func:`read_base_shape` GETs ``config.json`` (a few KB) from the base's folder, or the
first bytes of a GGUF file (its metadata and tensor table; :func:`shape_from_gguf_header`).

Parameter counts: a GGUF header lists every tensor's shape, so its count is exact; a config.json
count follows the architecture's layout (gated-MLP decoders — Llama, Mistral, Qwen2, Gemma,
Phi-3, SmolLM — and GPT-2-style decoders), exact for those families and stated as derived.

The GGUF header parser is written here rather than taken from the ``gguf`` package:
``gguf.GGUFReader`` memory-maps a whole file and builds a view of every tensor's data, so it cannot
read the few hundred KB prefix an object-store range read returns. The format (magic, version,
counts, typed key/value pairs, then name/shape/type/offset per tensor) is small and versioned
(v2/v3 here); anything else is refused with the file named.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from kubetune_registry.storage import ObjectNotFound, StorageError, StoreSettings, join_key, open_uri

GGUF_MAGIC = b"GGUF"
GGUF_HEADER_READ_BYTES = 64 * 1024 * 1024
"""The most of a GGUF file the plan reads, 1 MiB at a time until its metadata (the tokenizer's
vocabulary is the largest part, ~1-5 MB) and tensor table are complete; the weights after them are
never read."""
_GGUF_CHUNK = 1024 * 1024

# Gated-MLP decoder families (gate/up/down projections), by config.json model_type.
_GATED = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "smollm3",
    "cohere",
    "stablelm",
}


class ShapeError(Exception):
    """The base model's config cannot be read or understood; the message names the file."""


class GgufHeaderTruncated(ShapeError):
    """The bytes given end before the GGUF tensor table does."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a decoder-only transformer."""

    architecture: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool
    parameters: int
    source: str  # "config.json" or "gguf header"
    exact_count: bool  # the count came from the tensor table (GGUF) rather than the layout

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one block, by its usual module name."""
        h, i = self.hidden, self.intermediate
        out = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
        }
        if self.gated_mlp:
            out |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        else:
            out |= {"up_proj": (h, i), "down_proj": (i, h)}
        return out

    def head_parameters(self) -> int:
        """Parameters of the LM head (0 when tied to the embeddings)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layout_parameters(
    layers: int, hidden: int, intermediate: int, q_dim: int, kv_dim: int, vocab: int, tied: bool, gated: bool
) -> int:
    attn = hidden * q_dim * 2 + hidden * kv_dim * 2
    mlp = (3 if gated else 2) * hidden * intermediate
    norms = 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * (attn + mlp + norms) + hidden


def shape_from_config(config: dict[str, Any], *, name: str = "config.json") -> ModelShape:
    """A :class:`ModelShape` from a transformers ``config.json`` dict. Raises ShapeError when the
    fields a decoder needs are missing (the message names them)."""
    cfg = dict(config)
    if "text_config" in cfg and "num_hidden_layers" not in cfg:  # multimodal wrappers
        cfg = {
            **cfg["text_config"],
            "model_type": cfg["text_config"].get("model_type", cfg.get("model_type")),
        }
    model_type = str(cfg.get("model_type") or "unknown")
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    vocab = cfg.get("vocab_size")
    missing = [
        key
        for key, value in (
            ("num_hidden_layers", layers),
            ("hidden_size", hidden),
            ("num_attention_heads", heads),
            ("vocab_size", vocab),
        )
        if not isinstance(value, int) or value <= 0
    ]
    if missing:
        raise ShapeError(
            f"{name}: no {', '.join(missing)} (model_type {model_type!r}); cannot plan its memory"
        )
    assert isinstance(layers, int) and isinstance(hidden, int) and isinstance(heads, int)
    assert isinstance(vocab, int)
    gated = model_type in _GATED or (
        "intermediate_size" in cfg and "n_inner" not in cfg and model_type != "gpt2"
    )
    intermediate = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    tied = bool(cfg.get("tie_word_embeddings", True))
    params = _layout_parameters(
        layers, hidden, int(intermediate), heads * head_dim, kv_heads * head_dim, vocab, tied, gated
    )
    return ModelShape(
        architecture=model_type,
        layers=layers,
        hidden=hidden,
        intermediate=int(intermediate),
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab=vocab,
        tied_embeddings=tied,
        gated_mlp=gated,
        parameters=params,
        source="config.json",
        exact_count=False,
    )


# --- GGUF -------------------------------------------------------------------------------------

# Value types of the GGUF metadata (gguf spec: GGUFValueType).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Truncated
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS and count > 64:  # token scores/types: skip, keep the length
                self.take(struct.calcsize(_SCALARS[item_type]) * count)
                return _Length(count)
            items = [self.value(item_type) for _ in range(count)]
            return _Length(count) if item_type == _STRING and count > 64 else items
        raise ShapeError(f"unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class _Length:
    """A long array (a vocabulary) kept only as its length."""

    n: int


def shape_from_gguf_header(data: bytes, *, name: str = "model.gguf") -> ModelShape:
    """A :class:`ModelShape` from the first bytes of a GGUF file (metadata and tensor table).
    Raises ShapeError when it is not GGUF v2/v3, is cut before the tensor table ends (the message
    says so) or lacks the architecture's block count and widths."""
    cur = _Cursor(data)
    try:
        if cur.take(4) != GGUF_MAGIC:
            raise ShapeError(f"{name}: not a GGUF file (no GGUF magic bytes)")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ShapeError(f"{name}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        tensors: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            tname = cur.string()
            dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
            cur.unpack("<I")  # type
            cur.unpack("<Q")  # offset
            tensors[tname] = dims
    except _Truncated:
        raise GgufHeaderTruncated(
            f"{name}: its metadata and tensor table are longer than the {len(data):,} bytes read"
        ) from None
    arch = str(meta.get("general.architecture") or "")
    if not arch:
        raise ShapeError(f"{name}: GGUF metadata has no general.architecture")

    def num(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (some architectures): the largest
            value = max(value) if value else default
        if not isinstance(value, int) or value <= 0:
            raise ShapeError(f"{name}: GGUF metadata has no {arch}.{key}; cannot plan its memory")
        return value

    layers, hidden, heads = num("block_count"), num("embedding_length"), num("attention.head_count")
    kv_heads = num("attention.head_count_kv", heads)
    intermediate = num("feed_forward_length")
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_len = tokens.n if isinstance(tokens, _Length) else len(tokens) if isinstance(tokens, list) else None
    embed = tensors.get("token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size") or (embed[1] if embed and len(embed) == 2 else None) or vocab_len
    if not isinstance(vocab, int) or vocab <= 0:
        raise ShapeError(f"{name}: no vocabulary size in its GGUF metadata")
    params = sum(math.prod(dims) for dims in tensors.values())
    gated = any(t.endswith("ffn_gate.weight") for t in tensors) or not tensors
    if not tensors:
        params = _layout_parameters(
            layers, hidden, intermediate, heads * head_dim, kv_heads * head_dim, vocab, True, gated
        )
    return ModelShape(
        architecture=arch,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=int(head_dim),
        vocab=vocab,
        tied_embeddings="output.weight" not in tensors,
        gated_mlp=gated,
        parameters=params,
        source="gguf header",
        exact_count=bool(tensors),
    )


# --- from a store -----------------------------------------------------------------------------


def read_base_shape(
    uri: str, settings: StoreSettings, *, registry_output_uri: str | None = None
) -> ModelShape:
    """The shape of the base model at ``uri`` (``s3://`` or ``file://``: a folder with config.json,
    a ``.gguf`` file, or a folder with one; ``modelversion://``: its ``merged/config.json``), read
    from the config alone. Raises ShapeError (nothing to read the shape from: the message says what
    was looked for) and StorageError."""
    if uri.startswith("hf://"):
        raise ShapeError(
            f"{uri}: a Hub model's config is not read before its download (mirror it to s3:// or file://)"
        )
    if uri.startswith("modelversion://"):
        if registry_output_uri is None:
            raise ShapeError(f"{uri}: no registry to resolve it in")
        from kubetune_registry.versions import ModelRegistry

        name, _, ref = uri.removeprefix("modelversion://").partition("/")
        version = ModelRegistry(registry_output_uri, name, settings).get_version(ref)
        uri = version.uri.rstrip("/") + "/merged"
    store, key = open_uri(uri, settings)
    if key.lower().endswith(".gguf"):
        return _gguf_shape(store, key)
    prefix = key.rstrip("/")
    config_key = join_key(prefix, "config.json") if prefix else "config.json"
    try:
        data, _etag = store.get_bytes(config_key)
    except ObjectNotFound:
        ggufs = sorted(
            info.key
            for info in store.list(prefix + "/" if prefix else "")
            if info.key.lower().endswith(".gguf")
        )
        if len(ggufs) == 1:
            return _gguf_shape(store, ggufs[0])
        raise ShapeError(
            f"{uri}: no config.json (nor a single .gguf file) to read the model's shape from"
        ) from None
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise ShapeError(f"{uri}/config.json: not JSON ({exc})") from None
    return shape_from_config(config, name=f"{uri.rstrip('/')}/config.json")


def _gguf_shape(store: Any, key: str) -> ModelShape:
    """Read a GGUF file's head 1 MiB at a time until its header parses (never past the limit)."""
    name = PurePosixPath(key).name
    data = b""
    with store.open_read(key) as f:
        while True:
            chunk = f.read(_GGUF_CHUNK)
            data += chunk
            try:
                return shape_from_gguf_header(data, name=name)
            except GgufHeaderTruncated:
                if not chunk or len(data) >= GGUF_HEADER_READ_BYTES:
                    raise


__all__ = [
    "GGUF_HEADER_READ_BYTES",
    "GgufHeaderTruncated",
    "ModelShape",
    "ShapeError",
    "StorageError",
    "read_base_shape",
    "shape_from_config",
    "shape_from_gguf_header",
]
