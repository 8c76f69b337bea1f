"""ringserve's own GGUF layout reader (workers/gguf_file.py) against the `gguf` package's GGUFReader as the
independent oracle: every metadata value and every tensor's type, shape and bytes, on a file with a field of
each value type and tensors of float and block-quantized types, and on the default model; and damaged files
refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from ringserve.workers.gguf_file import GGUFFormatError, read_gguf_file
from ringserve.workers.loader import ModelLoadError, default_model_path, load_model


def oracle(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, t.tensor_type, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes()) for t in r.tensors]
    return fields, tensors


def assert_same_as_oracle(path):
    f = read_gguf_file(path)
    fields, tensors = oracle(path)
    assert f.fields == fields
    assert [(t.name, t.tensor_type, t.shape, t.data.tobytes()) for t in f.tensors] == tensors


@pytest.fixture
def every_kind(tmp_path):
    import gguf

    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("k.u8", 200)
    w.add_int8("k.i8", -7)
    w.add_uint16("k.u16", 60000)
    w.add_int16("k.i16", -300)
    w.add_uint32("k.u32", 4_000_000_000)
    w.add_int32("k.i32", -2_000_000)
    w.add_float32("k.f32", 0.1)
    w.add_uint64("k.u64", 2**63 + 5)
    w.add_int64("k.i64", -(2**40))
    w.add_float64("k.f64", 1e-300)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "ünïcode ✓")
    w.add_array("k.ints", [3, -1, 4])
    w.add_array("k.floats", [0.5, 2.25])
    w.add_array("k.strs", ["a", "", "ccc"])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    for q in ("Q8_0", "Q4_1"):
        qt = getattr(gguf.GGMLQuantizationType, q)
        a = rng.standard_normal((4, 64)).astype(np.float32)
        w.add_tensor(q.lower(), gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_and_tensor_kind_reads_as_the_gguf_package_reads_it(every_kind):
    assert_same_as_oracle(every_kind)
    f = read_gguf_file(every_kind)
    assert f.fields["k.u64"] == 2**63 + 5 and f.fields["k.str"] == "ünïcode ✓"
    assert {t.name: t.shape for t in f.tensors}["f32"] == (5, 3)  # GGML order: the fastest dimension first


@pytest.mark.slow
def test_the_default_model_reads_as_the_gguf_package_reads_it():
    assert_same_as_oracle(default_model_path())


@pytest.mark.parametrize("damage", ["empty", "magic", "version", "truncated_header", "truncated_data"])
def test_damaged_files_are_refused_with_what_is_wrong(every_kind, tmp_path, damage):
    data = every_kind.read_bytes()
    bad = tmp_path / "bad.gguf"
    edits = {
        "empty": b"",
        "magic": b"GGUX" + data[4:],
        "version": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "truncated_header": data[:200],
        "truncated_data": data[:-100],
    }
    bad.write_bytes(edits[damage])
    with pytest.raises(GGUFFormatError):
        read_gguf_file(bad)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(bad)
