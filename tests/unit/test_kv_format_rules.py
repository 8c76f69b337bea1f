"""KV formats at the API's edge, without Ray: the Gateway's reading of kv_format / kv_keep_fraction on
CreateSession and UpdateSession, the SDK's requests, and retention priced by stored bytes."""

from fractions import Fraction

import grpc
import pytest
from google.protobuf import field_mask_pb2

from ringserve.client import _wire
from ringserve.cluster import rules
from ringserve.cluster.billing import HOUR_MS, Rates
from ringserve.proto.ringserve.v1 import ringserve_pb2 as pb


@pytest.mark.parametrize("value,frac,name", [(pb.KV_FORMAT_UNSPECIFIED, 0.0, "exact"), (pb.EXACT, 0.0, "exact"),
                                             (pb.FP8, 0.0, "fp8"), (pb.INT4, 0.0, "int4"),
                                             (pb.KEEP, 0.3, "keep:0.3")])
def test_create_formats(value, frac, name):
    assert str(rules.kv_format(value, frac)) == name
    assert rules.kv_format_pb(name) == ((pb.EXACT if value == pb.KV_FORMAT_UNSPECIFIED else value), frac)


@pytest.mark.parametrize("value,frac,why", [(pb.KEEP, 0.0, "within"), (pb.KEEP, 1.0, "within"),
                                            (pb.KEEP, float("nan"), "within"), (pb.INT4, 0.5, "only with"),
                                            (pb.EXACT, 0.2, "only with"), (42, 0.0, "not a known value")])
def test_bad_create_formats_are_invalid_argument(value, frac, why):
    with pytest.raises(rules.RpcError, match=why) as e:
        rules.kv_format(value, frac)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _update(paths, **fields):
    return pb.UpdateSessionRequest(session=pb.Session(name="sessions/s-0123456789abcdef", **fields),
                                   update_mask=field_mask_pb2.FieldMask(paths=paths))


@pytest.mark.parametrize("paths,fields,name", [
    (["kv_format"], {"kv_format": pb.INT4}, "int4"),
    (["kv_format", "kv_keep_fraction"], {"kv_format": pb.KEEP, "kv_keep_fraction": 0.25}, "keep:0.25"),
    (["kv_keep_fraction"], {"kv_keep_fraction": 0.5}, "keep:0.5"),  # the fraction alone means KEEP
])
def test_update_formats(paths, fields, name):
    u = rules.update(_update(paths, **fields), 0.0, max_s=3600)
    assert str(u.kv_format) == name and u.expire_time is None and u.retention is None


@pytest.mark.parametrize("paths,fields,why", [
    (["kv_format"], {}, "unset"),
    (["kv_format"], {"kv_format": pb.KEEP, "kv_keep_fraction": 0.5}, "kv_keep_fraction in the update_mask"),
    (["kv_format", "kv_keep_fraction"], {"kv_format": pb.FP8, "kv_keep_fraction": 0.5}, "only with"),
    (["kv_keep_fraction"], {"kv_keep_fraction": 1.5}, "within"),
    (["kv_format"], {"kv_format": 9}, "not a known value"),
])
def test_bad_updates_are_invalid_argument(paths, fields, why):
    with pytest.raises(rules.RpcError, match=why) as e:
        rules.update(_update(paths, **fields), 0.0, max_s=3600)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("fmt", ["exact", "fp8", "int4", "keep:0.3"])
def test_sdk_requests_carry_the_format(fmt):
    req = _wire.create_request("hello", None, None, ttl=None, expire_time=None, retention="standard",
                               persist="on_demote", display_name="", allow_quantized_kv=False, request_id=None,
                               kv_format=fmt)
    assert str(rules.kv_format(req.kv_format, req.kv_keep_fraction)) == fmt
    up = _wire.format_update("sessions/s-0123456789abcdef", fmt)
    if fmt != "exact":
        assert str(rules.update(up, 0.0, max_s=60).kv_format) == fmt
    s = pb.Session(kv_format=req.kv_format, kv_keep_fraction=req.kv_keep_fraction)
    assert _wire.kv_format_name(s) == fmt


def test_retention_is_priced_by_stored_bytes_to_the_nano_unit():
    rates = Rates(retention={"standard": {"hbm": 4.5, "host": 1.0, "redis": 0.25}})
    exact_bytes, int4_bytes = 3 * 4096 * 128, 3 * 4096 * 40  # three pages, 128 B exact vs 40 B packed per token-head
    for token_ms in (1, 999, 123_456_789, 7 * HOUR_MS * 5000):
        full = rates.retention_nanos("standard", "hbm", token_ms, exact_bytes, exact_bytes)
        packed = rates.retention_nanos("standard", "hbm", token_ms, int4_bytes, exact_bytes)
        # computed here from the price: tokens x ms x $/1M token-hours = 1e-9 units x token_ms x price / 3600
        want = Fraction(token_ms) * Fraction("4.5") / 3600
        assert full == round(want) == rates.retention_nanos("standard", "hbm", token_ms)
        assert packed == round(want * Fraction(int4_bytes, exact_bytes))
        assert abs(packed - full * Fraction(int4_bytes, exact_bytes)) <= 1  # the stored-bytes ratio, to the nano
