"""A GGUF file's metadata and tensor table, read in one pass over a memory map.

Why not `gguf.GGUFReader`: it builds a numpy memmap slice for every part of every metadata value, and a
tokenizer's vocabulary and merges are ~100K strings: 5 s of a 10 s load of the default model, paid by every
rank, every CLI call and every Gateway that reads the context limit. Here a string is one `struct` read
and a numeric array one `np.frombuffer`. Tensor data are plain ndarray views of the map (no copy, no
memmap subclass: dequantizing them is not slowed by per-slice overhead).

Only the layout is read here (GGUF v2/v3, little-endian, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md);
the `gguf` package still names the quantization types, gives their block sizes and dequantizes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type -> (struct code, numpy dtype) for the fixed-size types; 8 = string, 9 = array
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
            5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
            12: ("d", np.float64)}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (the message says what is wrong)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGML order: the fastest-varying dimension first
    data: np.ndarray  # float types: the elements, flat; quantized types: the raw bytes, flat (uint8)


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    fields: dict  # key -> python value (str, int, float, bool, or a list for arrays)
    tensors: tuple[GGUFTensor, ...]


class _Cursor:
    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def take(self, code: str):
        v = struct.unpack_from("<" + code, self.buf, self.at)[0]
        self.at += struct.calcsize("<" + code)
        return v

    def string(self) -> str:
        n = self.take("Q")
        end = self.at + n
        if end > len(self.buf):
            raise GGUFFormatError(f"a string of {n} bytes runs past the end of the file at offset {self.at}")
        s = bytes(self.buf[self.at:end]).decode("utf-8", errors="replace")
        self.at = end
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("I"), self.take("Q")
            if itype == _STRING:
                return [self.string() for _ in range(n)]
            if itype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            if itype not in _SCALARS:
                raise GGUFFormatError(f"unknown array element type {itype} at offset {self.at}")
            dt = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
            if self.at + n * dt.itemsize > len(self.buf):
                raise GGUFFormatError(f"an array of {n} values runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.at)
            self.at += n * dt.itemsize
            return arr.tolist()
        if vtype not in _SCALARS:
            raise GGUFFormatError(f"unknown value type {vtype} at offset {self.at}")
        return self.take(_SCALARS[vtype][0])


def read_gguf_file(path: str | Path) -> GGUFFile:
    """Parse the header, the metadata and the tensor table; tensor data stay in the memory map."""
    import gguf

    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise GGUFFormatError(f"cannot map the file: {e}") from e
    if buf[:4] != MAGIC:
        raise GGUFFormatError(f"no GGUF magic (starts with {bytes(buf[:4])!r})")
    c = _Cursor(buf)
    c.at = 4
    try:
        version = c.take("I")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise GGUFFormatError(f"GGUF version {version}{hint} is not supported (2 and 3 are)")
        n_tensors, n_kv = c.take("Q"), c.take("Q")
        fields: dict = {}
        for _ in range(n_kv):
            key = c.string()
            fields[key] = c.value(c.take("I"))
        table = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.take("Q") for _ in range(c.take("I")))
            table.append((name, dims, c.take("I"), c.take("Q")))
    except struct.error as e:
        raise GGUFFormatError(f"the file ends inside its header: {e}") from e
    align = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-c.at // align) * align
    tensors = []
    for name, dims, qtype, offset in table:
        try:
            qt = gguf.GGMLQuantizationType(qtype)
        except ValueError as e:
            raise GGUFFormatError(f"tensor {name} has unknown type {qtype}") from e
        block, size = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if n % block:
            raise GGUFFormatError(f"tensor {name}: {n} elements is not a whole number of {qt.name} blocks")
        nbytes = n // block * size
        at = start + offset
        if at + nbytes > len(buf):
            raise GGUFFormatError(f"tensor {name} runs past the end of the file")
        dt = _element_dtype(qt)
        if dt is not None:  # a plain element type: F32, F16, F64, I8..I64
            data = np.frombuffer(buf, dtype=dt, count=n, offset=at)
        else:  # quantized (and BF16): raw bytes, as gguf.quants.dequantize takes them
            data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=at)
        tensors.append(GGUFTensor(name, qt, dims, data))
    return GGUFFile(str(path), version, fields, tuple(tensors))


# element type name -> numpy dtype; every other type is stored as blocks of bytes
_ELEMENTS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}


def _element_dtype(qt) -> np.dtype | None:
    """The numpy dtype of an element type's values; None for the types stored as blocks of bytes."""
    dt = _ELEMENTS.get(qt.name)
    return np.dtype(dt).newbyteorder("<") if dt is not None else None
