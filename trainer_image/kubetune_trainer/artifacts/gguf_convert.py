"""Run llama.cpp's own HF -> GGUF converter, then (optionally) llama.cpp's quantizer, in this process.

Run as a script (never imported by the trainer): ``python gguf_convert.py CONVERTER_DIR MERGED_DIR
OUT_FILE --outtype f16|f32 [--ftype N] [--report REPORT.json]``. CONVERTER_DIR holds
``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` from the llama-cpp-python sdist
(``scripts/build-llama-cpp.sh``). :mod:`kubetune_trainer.artifacts.gguf_export` starts it in a
subprocess, so the converter's imports and llama.cpp's C code never run inside the trainer.

One thing is added to the converter, and REPORT.json says when it was used: the converter names a
BPE tokenizer's pre-tokenizer by hashing the token ids of a fixed text against tokenizers it knows,
so a tokenizer trained locally (the demo's) is never recognised, even when its pre-tokenizer is
exactly GPT-2's. Only then, and only when ``tokenizer.json`` has no normalizer and its
pre-tokenizer is GPT-2's byte-level regex split (``ByteLevel``, ``use_regex: true``), the
pre-tokenizer is named ``gpt-2``; anything else still fails as the converter fails.

With ``--ftype`` the converted file (``--outtype f32`` is the sensible source) is quantized by
``llama_model_quantize`` (llama-cpp-python's binding of llama.cpp's C API) into OUT_FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "use_regex": True}


def _gpt2_byte_level(model_dir: Path) -> bool:
    """tokenizer.json pre-tokenizes exactly as GPT-2 does (what llama.cpp calls ``gpt-2``)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and all(pre.get(k) == v for k, v in GPT2_PRE_TOKENIZER.items())
        and pre.get("add_prefix_space") in (False, None)
        and (spec.get("model") or {}).get("type") == "BPE"
    )


def convert(converter_dir: Path, model_dir: Path, out_file: Path, outtype: str) -> dict[str, Any]:
    sys.path[:0] = [str(converter_dir / "gguf-py"), str(converter_dir)]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    report: dict[str, Any] = {"pre_tokenizer_fallback": None}
    recognised = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(recognised(self, tokenizer))
        except NotImplementedError:
            if not _gpt2_byte_level(Path(self.dir_model)):
                raise
            report["pre_tokenizer_fallback"] = "gpt-2"
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    convert_hf_to_gguf.main()
    return report


def quantize(source: Path, out_file: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {out_file}, ftype {ftype}) returned {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converter_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--outtype", choices=("f16", "f32", "bf16"), default="f16")
    parser.add_argument("--ftype", type=int, default=None, help="llama_ftype to quantize to")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    if args.ftype is None:
        report = convert(args.converter_dir, args.model_dir, args.out_file, args.outtype)
    else:
        with tempfile.TemporaryDirectory(prefix=".gguf-src.", dir=args.out_file.parent) as tmp:
            source = Path(tmp) / "source.gguf"
            report = convert(args.converter_dir, args.model_dir, source, args.outtype)
            quantize(source, args.out_file, args.ftype)
    if args.report is not None:
        args.report.write_text(json.dumps(report) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
