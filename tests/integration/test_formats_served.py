"""KV formats through the service (SDK over a real gRPC channel, Ray Serve, a group of the default model,
SP = 1 to keep CI short — formats at SP = 2 are checked in test_kv_formats.py —, a real redis-server): chosen at create, lowered by UpdateSession and never raised, priced by stored
bytes in the Session and the ledger; and `ringserve bench recall` against the server, each answer checked
against what transformers generates greedily from the same prompt tokens."""

import json

import grpc
import pytest
import torch

from ringserve.client import Client, errors

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

KEY = "key-formats"
TEXT = ("The lighthouse keeper wrote in his log that the storm had passed by midnight, that the supply boat "
        "would come on Thursday, and that the secret code for the radio room was amber-falcon-42. ") * 12


@pytest.fixture(scope="module")
def address():
    from ringserve.cluster.config import ApiKey
    from serve_cluster import local_service

    with local_service({
        "model": "default", "groups": 1,
        "sweep_interval_s": 1.0, "progress_chunk": 1024, "limits": {"max_sessions": 16, "max_tokens": 40000},
        "group": {"sp": 1, "num_cpus_per_rank": 1.0, "kv_device_bytes": 256 << 20, "kv_host_bytes": 128 << 20,
                  "prefill_chunk": 1024, "collective_timeout_s": 60, "call_timeout_s": 300},
        "billing": {"meter_interval_s": 1.0},
        "api_keys": [vars(ApiKey.from_plain(KEY, "tenant-f"))],
    }) as address:
        yield address


def itemsize(s) -> int:
    """Bytes of one K/V element of the default model (30 layers, 3 KV heads of 64) as the group holds it."""
    per_token = s.exact_kv_bytes // s.size_tokens
    assert per_token * s.size_tokens == s.exact_kv_bytes and per_token % (2 * 30 * 3 * 64) == 0
    return per_token // (2 * 30 * 3 * 64)


@pytest.fixture(scope="module")
def client(address):
    with Client(address, api_key=KEY, timeout=600) as c:
        yield c


def test_formats_chosen_at_create_are_stored_and_priced_by_their_bytes(client):
    made = {f: client.create_session(TEXT, kv_format=f, ttl="10m") for f in ("exact", "int4", "keep:0.5")}
    try:
        for s in made.values():
            s.refresh()
        exact = made["exact"]
        assert {f: s.kv_format for f, s in made.items()} == {f: f for f in made}
        assert len({s.size_tokens for s in made.values()}) == 1 and exact.size_tokens > 400
        assert len({s.exact_kv_bytes for s in made.values()}) == 1
        # K/V of 3 heads x 64 over 30 layers in the model's dtype; whole pages of 256 tokens hold them
        head = itemsize(exact) * 64  # bytes of one token-head, exact
        assert exact.stored_kv_bytes == exact.exact_kv_bytes <= exact.kv_bytes
        assert made["int4"].stored_kv_bytes * head == exact.exact_kv_bytes * 40  # 32 + 4 x 2 bytes per token-head
        keep = made["keep:0.5"].stored_kv_bytes / exact.exact_kv_bytes
        assert 0.45 < keep < 0.5 + 140 / exact.size_tokens  # half, at least the sinks and recent tokens of each rank
        for s in made.values():  # the price now: the tier's rate x tokens x stored bytes / exact bytes
            assert s.tier == "hbm" and s.currency == "USD" and s.kv_bytes >= s.stored_kv_bytes
            want = exact.retention_rate * s.stored_kv_bytes / s.exact_kv_bytes
            assert s.retention_rate == pytest.approx(want, abs=1e-9) and s.retention_rate > 0  # to the nano-unit
        answers = {f: s.generate("What is the secret code for the radio room?", max_tokens=12).text()
                   for f, s in made.items()}
        assert all(answers.values()), answers  # every form answers (what it answers: the recall benchmark below)
    finally:
        for s in made.values():
            s.delete()


def test_update_lowers_the_format_and_never_raises_it(client, address):
    from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb
    from ringserve.proto.ringserve.v1 import ringserve_pb2_grpc as pb_grpc

    s = client.create_session(TEXT, ttl="10m")
    try:
        s.refresh()
        sizes = [s.stored_kv_bytes]
        for fmt in ("fp8", "int4"):
            s.set_kv_format(fmt)  # the answer of the update is the session in its new form
            assert s.kv_format == fmt and s.stored_kv_bytes < sizes[-1] and s.exact_kv_bytes == sizes[0]
            sizes.append(s.stored_kv_bytes)
            assert s.refresh().kv_format == fmt and s.stored_kv_bytes == sizes[-1]
        assert sizes[1] * itemsize(s) * 64 == sizes[0] * (64 + 4)  # e4m3 + an fp32 scale per token-head
        for up in ("fp8", "exact"):
            with pytest.raises(errors.FailedPrecondition, match="only changes to a smaller"):
                s.set_kv_format(up)
        assert s.refresh().kv_format == "int4" and s.stored_kv_bytes == sizes[-1]  # a refused change changes nothing
        assert s.generate("What is the secret code for the radio room?", max_tokens=8).text()
        with grpc.insecure_channel(address) as ch:  # what the SDK would not send
            stub, md = pb_grpc.RingServeStub(ch), (("authorization", f"Bearer {KEY}"),)
            for paths, fields in ((["kv_format"], {}), (["kv_format"], {"kv_format": pb.KEEP}),
                                  (["kv_keep_fraction"], {"kv_keep_fraction": 2.0})):
                with pytest.raises(grpc.RpcError) as e:
                    stub.UpdateSession(pb.UpdateSessionRequest(
                        session=pb.Session(name=s.name, **fields), update_mask={"paths": paths}), metadata=md)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (paths, e.value.details())
            with pytest.raises(grpc.RpcError) as e:
                stub.CreateSession(pb.CreateSessionRequest(text="hello there", kv_format=pb.INT4,
                                                           kv_keep_fraction=0.5), metadata=md).next()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the ledger priced each stretch by its format: exact, then fp8, then int4 (interval closed by the change)
        s.delete()
        rows = [json.loads(line) for line in "".join(client.export_usage("1h", session=s.name)).splitlines()]
        ret = [r for r in rows if r["kind"] == "retention"]
        seen = {r["kv_format"]: r["stored_kv_bytes"] for r in ret}  # (an hour boundary may split a stretch)
        assert [f for i, f in enumerate(r["kv_format"] for r in ret) if i == 0 or ret[i - 1]["kv_format"] != f] == [
            "exact", "fp8", "int4"]
        assert seen == dict(zip(["exact", "fp8", "int4"], sizes)) and {r["exact_kv_bytes"] for r in ret} == {sizes[0]}
        by = {li.key for li in client.usage("1h", group_by="kv_format").line_items}
        assert {"exact", "fp8", "int4", "compute"} <= by
    finally:
        try:
            s.delete()
        except errors.NotFound:
            pass


# Two of the six tasks keep CI short: one question per session, and four questions against one retained
# session (the contexts of every task are checked in tests/unit/test_recall_tasks.py).
RECALL_TASKS = ("niah_single", "niah_multiquery")
RECALL_LENGTH = 512


def test_bench_recall_over_grpc_measures_the_model(address, tmp_path, capsys, hf_default_model):
    """`ringserve bench recall` against the server, EXACT, one sample per task: every answer is what
    transformers generates greedily from the same prompt tokens, scored by substring match."""
    from ringserve.cluster.cli import main
    from ringserve.cluster.recall import counter, make_sample, score
    from ringserve.workers.loader import load_tokenizer

    out = tmp_path / "recall"
    assert main(["bench", "recall", "--address", address, "--api-key", KEY, "--lengths", str(RECALL_LENGTH),
                 "--depths", "0.5", "--formats", "exact", "--samples", "1", "--tasks", ",".join(RECALL_TASKS),
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for task in RECALL_TASKS:
        assert f"| {task} | {RECALL_LENGTH} | exact |" in table
    rec = json.loads((out / "recall.json").read_text())
    assert {(r["task"], r["format"]) for r in rec["records"]} == {(t, "exact") for t in RECALL_TASKS}
    assert all(r["bytes_ratio"] == 1.0 for r in rec["records"])
    for png in ["recall_heatmap_exact.png", "recall_vs_bytes.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {a["task"] for a in answers} == set(RECALL_TASKS) and len(answers) == 1 + 4

    tok = load_tokenizer("default")
    hf = hf_default_model
    count = counter("default")
    stop = sorted(tok.stop_ids)
    for a in answers:
        sample = make_sample(a["task"], a["length"], a["depth"], a["sample"], count, rec["config"]["seed"])
        q = next(q for q in sample.questions if q.text == a["question"])
        ids = (tok.encode_chat([{"role": "user", "content": sample.context}], add_generation_prompt=False)
               + tok.encode_turn([{"role": "user", "content": q.text}], add_generation_prompt=True))
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=q.max_tokens, do_sample=False, eos_token_id=stop,
                              pad_token_id=0)[0, len(ids):].tolist()
        gen = [t for t in gen if t not in stop]
        assert a["answer"] == tok.decode(gen), (a["task"], a["answer"])
        assert a["score"] == score(a["answer"], q.references)
    # the scores of the records are those of the answers
    for r in rec["records"]:
        mine = [a["score"] for a in answers if a["task"] == r["task"]]
        assert r["accuracy"] == pytest.approx(sum(mine) / len(mine))
