"""Retained KV formats (exact, fp8, int4, keep): stored packed in the session's pages on every tier, the
compressed bytes unchanged by tier moves, attention over them the same through the paged kernel and the
CPU path, formats that only move down, and a kept set that depends on the context alone."""

import pytest
import torch

from helpers import TEXT, make_tiny_llama, needs_triton, rel_err, run_gloo
from ringserve.workers.engine import ShardEngine
from ringserve.workers.kvpages import PageGeometry
from ringserve.workers.kvstore import KVStore, TierCapacity
from ringserve.workers.loader import load_model
from ringserve.workers.protocol import FormatError
from ringserve.workers.sampling import SamplingParams

FORMATS = ("exact", "fp8", "int4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny-fmt")
    make_tiny_llama(p, head_dim=32, layers=2)
    return str(p), load_model(p)


def raw_pages(store: KVStore, sid: str) -> list[torch.Tensor]:
    """The session's pages exactly as stored (data and scales of every layer, K and V), up to its last
    token (the unwritten slots of its last page hold whatever the pool had there)."""
    n = store.state(sid).tokens
    with store.lease(sid) as kv:
        out = []
        for layer in range(store.geometry.layers):
            out += [t[kv.pages].flatten(0, 1)[:n].clone() for t in kv.layer(layer) if t is not None]
        return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_tier_keeps_the_packed_bytes(redis_url, fmt):
    geo = PageGeometry(2, 2, 32, 16, torch.float32)
    store = KVStore("fmt-r0", "fmtfp0123", geo, TierCapacity(1 << 20, 1 << 20), redis_url=redis_url, chunk_bytes=4096)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 300, 2, 32, generator=g), torch.randn(2, 300, 2, 32, generator=g)
    store.put("s", k, v, kv_format=fmt, persist="write_through")
    store.flush()
    before, decoded = raw_pages(store, "s"), store.read("s")
    assert store.demote("s", "host").tier == "host" and store.demote("s", "redis").tier == "redis"
    after = raw_pages(store, "s")  # promoted back into other device pages
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, after))
    fresh = KVStore("fmt-r0", "fmtfp0123", geo, TierCapacity(1 << 20, 1 << 20), redis_url=redis_url)
    fresh.restore("s")  # another group adopts it from the write-through copy
    assert fresh.kv_format("s") == fmt
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, raw_pages(fresh, "s")))
    assert torch.equal(fresh.read("s")[0], decoded[0])
    # a packed session takes fewer pages: fp8 ~0.27 and int4 ~0.16 of exact's bytes in fp32
    exact_pages = -(-300 // 16)
    assert store.state("s").nbytes / (exact_pages * geo.page_bytes) <= {"exact": 1.0, "fp8": 0.34, "int4": 0.25}[fmt]
    store.close(), fresh.close()


@needs_triton
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_packed_sessions_through_the_paged_kernel_match_the_cpu_path(tiny, fmt):
    _, loaded = tiny
    ids = loaded.tokenizer.encode(TEXT * 2)[:90]
    out = {}
    for backend in ("auto", "triton"):
        eng = ShardEngine(loaded, prefill_chunk=40, block=16, attn_backend=backend, kv_device_bytes=4 << 20)
        eng.prefill("s", ids[:80], kv_format=fmt)
        logits = eng.append("s", ids[80:83])  # pass-Q over the packed pages
        toks = list(eng.generate("s", ids[83:84], SamplingParams(max_tokens=4), stop_ids=frozenset()))
        out[backend] = (logits, toks)
    assert rel_err(out["triton"][0], out["auto"][0]) < 1e-4
    assert out["triton"][1] == out["auto"][1]


def test_formats_only_move_down_and_shrink_the_session(tiny):
    _, loaded = tiny
    ids = loaded.tokenizer.encode(TEXT * 2)[:150]
    eng = ShardEngine(loaded, prefill_chunk=64, block=16, kv_device_bytes=4 << 20)
    eng.prefill("s", ids)
    sizes = [eng.store.state("s").nbytes]
    for fmt in ("fp8", "int4"):
        eng.set_format("s", fmt)
        sizes.append(eng.store.state("s").nbytes)
    assert sizes[0] > sizes[1] > sizes[2]
    for back in ("fp8", "exact"):
        with pytest.raises(FormatError, match="never back") as e:
            eng.set_format("s", back)
        assert e.value.grpc_code == "FAILED_PRECONDITION"
    assert eng.store.kv_format("s") == "int4" and len(list(eng.generate("s", ids[:2], SamplingParams(max_tokens=3)))) <= 3
    # a session converted from exact holds what a native one encodes from the same K/V: equal in the first
    # prefill chunk and in layer 0 (later chunks of a native one attend over the encoded earlier chunks)
    eng.prefill("c", ids)
    eng.set_format("c", "int4")
    eng.prefill("n", ids, kv_format="int4")
    conv, native = eng.store.read("c")[0], eng.store.read("n")[0]
    assert torch.equal(conv[:, :64], native[:, :64]) and torch.equal(conv[0], native[0])
    assert not torch.equal(conv, native)


def test_keep_depends_on_the_context_alone(tiny):
    _, loaded = tiny
    ids = loaded.tokenizer.encode(TEXT * 3)[:240]
    other = loaded.tokenizer.encode(" ".join(reversed(TEXT.split())) * 3)[:240]
    eng = ShardEngine(loaded, prefill_chunk=64, block=16, kv_device_bytes=8 << 20)
    for sid, ctx in (("a", ids), ("b", ids), ("c", other)):
        eng.prefill(sid, ctx)
    list(eng.generate("a", ids[5:9], SamplingParams(max_tokens=5)))  # questions asked before: not retained
    before = eng.store.state("a").nbytes
    for sid in ("a", "b", "c"):
        eng.set_format(sid, "keep", 0.4)
    kept = {sid: eng.store.read(sid)[0] for sid in ("a", "b", "c")}
    assert eng.store.state("a").tokens == 96 and eng.store.state("a").nbytes < before
    assert torch.equal(kept["a"], kept["b"])  # the same context keeps the same tokens
    first = eng.store.read("c")[0]
    assert not torch.equal(first, kept["a"])
    # sinks and the recent window are kept: the first and last stored keys are the session's own
    full = ShardEngine(loaded, prefill_chunk=64, block=16, kv_device_bytes=4 << 20)
    full.prefill("a", ids)
    k_full = full.store.read("a")[0]
    assert torch.equal(kept["a"][:, :4], k_full[:, :4]) and torch.equal(kept["a"][:, -64:], k_full[:, -64:])
    with pytest.raises(FormatError, match="cannot be thinned again"):
        eng.set_format("a", "keep", 0.2)
    out = list(eng.generate("a", ids[:3], SamplingParams(max_tokens=4), stop_ids=frozenset()))
    assert len(out) == 4  # a thinned session still answers, and takes turns
    eng.append("a", ids[10:20])
    assert eng.length("a") == 250 and eng.store.state("a").tokens == 106


def _sp_formats(rank, world, spec, ids):
    import torch.distributed as dist

    eng = ShardEngine(load_model(spec), dist.group.WORLD if world > 1 else None, prefill_chunk=48, block=16,
                      kv_device_bytes=8 << 20)
    out = {}
    for fmt in ("fp8", "int4"):
        eng.prefill(fmt, ids[:100], kv_format=fmt)
        out[fmt] = eng.append(fmt, ids[100:104])
    eng.prefill("k", ids[:100])
    eng.set_format("k", "keep", 0.5)
    out["keep-tokens"] = eng.store.state("k").tokens
    out["keep"] = eng.append("k", ids[100:104])
    return out


def test_packed_formats_at_sp2_give_the_logits_of_sp1(tiny):
    spec, loaded = tiny
    ids = loaded.tokenizer.encode(TEXT * 2)[:110]
    one = run_gloo(1, _sp_formats, spec, ids)[0]
    two = run_gloo(2, _sp_formats, spec, ids)
    for r in two:
        for fmt in ("fp8", "int4"):  # the same tokens quantized the same way, whichever rank holds them
            assert rel_err(r[fmt][0], one[fmt][0]) < 1e-4
    # KEEP chooses per rank among its own tokens: at SP = 2 each rank keeps half of what it holds
    assert sum(r["keep-tokens"] for r in two) >= one["keep-tokens"] - 2
