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
    eng.prefill("d", ids, kv_format="keep", keep_fraction=0.4)  # thinned at the end of its create
    kept = {sid: eng.store.read(sid)[0] for sid in ("a", "b", "c", "d")}
    assert eng.store.state("a").tokens == 96 and eng.store.state("a").nbytes < before
    assert torch.equal(kept["a"], kept["b"])  # the same context keeps the same tokens
    assert torch.equal(kept["a"], kept["d"]) and eng.store.kv_format("d") == "exact"  # asked at create or later
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
    eng.prefill("k0", ids[:100], kv_format="keep", keep_fraction=0.5)  # every rank thins it in the create's step
    out["keep-at-create"] = eng.store.read("k0")[0]
    out["keep-later"] = eng.store.read("k")[0][:, :out["keep-at-create"].shape[1]]
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
    for r in [one] + two:  # thinned at create: the tokens later thinning keeps, on every rank
        assert torch.equal(r["keep-at-create"], r["keep-later"])


def test_retention_is_billed_by_stored_bytes(tiny, redis_url):
    """Two sessions of the same tokens held the same time, EXACT and INT4: their retention costs are in the
    ratio of their stored bytes, to the nano-unit; a format change reprices from its instant, and usage
    by KV format and the export show it."""
    import uuid
    from fractions import Fraction

    from ringserve.cluster.billing import Ledger, Rates

    _, loaded = tiny
    ids = loaded.tokenizer.encode(TEXT * 3)[:200]
    eng = ShardEngine(loaded, prefill_chunk=64, block=16, kv_device_bytes=8 << 20)
    eng.prefill("e", ids)
    eng.prefill("q", ids, kv_format="int4")
    g = eng.store.geometry
    exact = len(ids) * g.token_bytes
    kv = {"e": eng.store.stored_bytes("e"), "q": eng.store.stored_bytes("q")}
    assert kv["e"] == exact and kv["q"] * 128 == exact * 24  # fp32, D = 32: 16 + 4 x 2 bytes per token-head, not 128
    assert eng.store.state("q").nbytes >= kv["q"]  # whole pages hold them

    now = [1_800_000_000.0 + 1800.25]  # half past an hour: the 1.5 h held spans two hour boundaries
    rates = Rates(retention={"standard": {"hbm": 4.5}})
    ledger = Ledger(redis_url, rates, clock=lambda: now[0])
    tenant, tag = f"t-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    for sid, fmt in (("e", "exact"), ("q", "int4")):
        ledger.open(f"{sid}-{tag}", tenant, t=now[0], tier="device", tokens=len(ids), retention="standard",
                    kv_format=fmt, kv_bytes=kv[sid], exact_bytes=exact)
    ledger.open(f"x-{tag}", tenant, t=now[0], tier="device", tokens=len(ids), retention="standard",
                kv_format="exact", kv_bytes=exact, exact_bytes=exact)
    now[0] += 600.5
    eng.set_format("e", "int4")  # the third session follows the first's bytes down after 600.5 s
    ledger.set_format(f"x-{tag}", "format:1", t=now[0], kv_format="int4", kv_bytes=eng.store.stored_bytes("e"),
                      exact_bytes=exact)
    now[0] += 4800.0
    for sid in ("e", "q", "x"):
        ledger.close(f"{sid}-{tag}", t=now[0])

    recs = ledger.records(tenant, now[0] - 86400, now[0] + 1)
    by = {sid: [r for r in recs if r["session"] == f"{sid}-{tag}" and r["kind"] == "retention"] for sid in "eqx"}
    assert [r["token_ms"] for r in by["e"]] == [r["token_ms"] for r in by["q"]] and len(by["e"]) == 3
    total = {sid: sum(r["nanos"] for r in rs) for sid, rs in by.items()}
    ratio = Fraction(kv["q"], exact)
    for re_, rq in zip(by["e"], by["q"]):  # each record: the exact price times the bytes ratio, rounded once
        assert rq["nanos"] == round(Fraction(re_["token_ms"]) * Fraction("4.5") / 3600 * ratio)
        assert (rq["kv_format"], rq["stored_kv_bytes"], rq["exact_kv_bytes"]) == ("int4", kv["q"], exact)
    assert abs(total["q"] - total["e"] * ratio) <= len(by["e"])  # within a nano per record
    # the converted one: exact until its change, then the int4 price
    assert [r["kv_format"] for r in by["x"]] == ["exact", "int4", "int4", "int4"]
    assert total["x"] == round(Fraction(len(ids) * 600_500) * Fraction("4.5") / 3600) + sum(
        round(Fraction(r["token_ms"]) * Fraction("4.5") / 3600 * ratio) for r in by["x"][1:])
    u = ledger.usage(tenant, now[0] - 86400, now[0] + 1, "kv_format")
    lines = {li["key"]: li for li in u["line_items"]}
    assert set(lines) == {"exact", "int4"}
    assert lines["exact"]["token_ms"]["hbm"] == len(ids) * (5400_500 + 600_500)
    csv = "".join(ledger.export(tenant, now[0] - 86400, now[0] + 1, "csv", session=f"q-{tag}"))
    head, first = csv.splitlines()[:2]
    row = dict(zip(head.split(","), first.split(",")))
    assert (row["kv_format"], int(row["stored_kv_bytes"]), int(row["exact_kv_bytes"])) == ("int4", kv["q"], exact)
