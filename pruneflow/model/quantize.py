"""Quantized GGUF through llama.cpp's own quantizer (``llama_model_quantize``, bound by llama-cpp-python): no
quantization of our own.

llama.cpp quantizes a 2-D tensor row by row in blocks: 32 values for ``q8_0``, 256 for the k-quants (``q6_k``,
``q5_k_m``, ``q4_k_m``; the ``_m`` mixes give some tensors — ``attn_v``, half of ``ffn_down``, ``output`` — a
bigger k-quant on purpose). A row whose length is not a multiple of the block cannot take the type: llama.cpp
falls back to another (``q5_0``/``q5_1``/``q8_0``, or f16 when even 32 does not divide the row) and says so in
its log, which is read here and reported tensor by tensor with the reason. A pruned width is a row length (o_proj
rows are the kept heads × head_dim, down_proj rows the kept channels), so ``prune.round_to: 256`` is what lets a
pruned model take a k-quant everywhere; the report says how much did not.

Only an unquantized file (f32, f16, bf16) is quantized: a quantization of a quantized file would compound two
errors and is refused, as is an unknown type — both before anything is written; the output goes to a temporary
file renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

from tqdm import tqdm

from pruneflow.atomic import check_output_file
from pruneflow.errors import PruneflowError

# our names → llama.cpp's file types (llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>)
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m")
UNQUANTIZED = ("F32", "F16", "BF16")
# llama.cpp's warning for a tensor that cannot take its type (src/llama-quant.cpp), e.g. "warning:
# blk.0.ffn_down.weight - ncols 688 not divisible by 256 (required for type q6_K) ... -> falling back to f16"
FALLBACK = re.compile(r"warning:\s*(?P<tensor>\S+)\s+-\s+ncols\s+(?P<cols>\d+)\s+not divisible by\s+(?P<block>\d+)"
                      r"\s+\(required for type\s+(?P<wanted>\S+)\).*?falling back to\s+(?P<got>\S+)")
# the line llama.cpp's quantizer starts each tensor with: "[  12/ 723] blk.1.attn_q.weight - [4096, 4096, ...]"
PROGRESS = re.compile(r"\[\s*(?P<n>\d+)/\s*(?P<total>\d+)\]")
FALLBACK_COUNT = re.compile(r"(?P<n>\d+) of (?P<total>\d+) tensor\(s\) required fallback")


def check_type(quantize: str) -> str:
    """``quantize`` as one of :data:`QUANT_TYPES` (case-insensitive), else a clear error."""
    name = quantize.lower()
    if name not in QUANT_TYPES:
        raise PruneflowError(f"unknown quantization type {quantize!r}; choose from {', '.join(QUANT_TYPES)}")
    return name


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise PruneflowError("quantizing a GGUF needs llama.cpp's quantizer from llama-cpp-python (pip install "
                             "llama-cpp-python; it builds llama.cpp from source)") from None
    return llama_cpp


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor of a GGUF file and its type's name (``F16``, ``Q4_K``, …)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise PruneflowError(f"{path} is not a readable GGUF file ({err})") from None
    return {t.name: t.tensor_type.name for t in reader.tensors}


def check_source(path: Path) -> None:
    """An unquantized GGUF file, else a clear error (before anything is written)."""
    if not path.is_file():
        raise PruneflowError(f"GGUF file {path} does not exist")
    quantized = sorted({kind for kind in tensor_types(path).values() if kind not in UNQUANTIZED})
    if quantized:
        raise PruneflowError(f"{path} is already quantized ({', '.join(quantized)}); quantize from an f32, f16 or "
                             f"bf16 export (pruneflow export gguf CHECKPOINT OUT --quantize TYPE)")


def quantize_gguf(source: Path, out: Path, quantize: str, threads: int | None = None,
                  overwrite: bool = False) -> dict:
    """Quantize the unquantized GGUF ``source`` into ``out`` with llama.cpp's quantizer; returns the type, the
    bytes before and after, the tensors per type, and each tensor that fell back to another type, with why."""
    name = check_type(quantize)
    source, out = Path(source), Path(out)
    check_output_file(out, overwrite)
    check_source(source)
    llama_cpp = llama_cpp_module()
    from llama_cpp import _logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
    params.nthread = threads or os.cpu_count() or 1
    lines: list[str] = []
    bar = tqdm(desc=f"quantizing to {name}", unit="tensor", leave=False)

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))
        if done := PROGRESS.match(lines[-1]):  # "[  12/ 723] blk.1.attn_q.weight - ...": tensor 12 of 723 begins
            bar.total = int(done["total"])
            bar.update(int(done["n"]) - 1 - bar.n)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.quantizing")  # not the exporter's temporary name
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            tail = "".join(lines).strip().splitlines()[-3:]
            raise PruneflowError(f"llama.cpp could not quantize {source} to {name} (status {status}): "
                                 + " | ".join(tail))
        os.replace(tmp, out)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        bar.close()
        tmp.unlink(missing_ok=True)
    log_text = "".join(lines)
    fallbacks = [{"tensor": m["tensor"], "wanted": m["wanted"].upper(), "got": m["got"].upper(),
                  "why": f"rows of {m['cols']} values are not a multiple of {m['block']}"}
                 for m in FALLBACK.finditer(log_text)]
    counted = FALLBACK_COUNT.search(log_text)  # llama.cpp's own count: exact even if a line's wording changes
    types = tensor_types(out)
    per_type: dict[str, int] = {}
    for kind in types.values():
        per_type[kind] = per_type.get(kind, 0) + 1
    return {"path": str(out), "quantize": name, "bytes": out.stat().st_size, "source_bytes": source.stat().st_size,
            "tensors": dict(sorted(per_type.items())), "fallbacks": fallbacks,
            "fallback_count": int(counted["n"]) if counted else len(fallbacks)}
