"""The typed cluster config: from YAML, as Serve application args, and its errors."""

import pytest

from ringserve.cluster.config import ApiKey, ServeConfig, hash_key


def test_yaml_round_trip_and_nested_types(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text("grpc_port: 6000\nredis_url: redis://r:6379/0\ngroups: 3\nmodel: /models/x.gguf\n"
                 "group: {sp: 4, num_gpus_per_rank: 1}\nlimits: {max_sessions: 7}\n"
                 f"api_keys: [{{sha256: {hash_key('k')}, tenant: acme, admin: true}}]\n")
    cfg = ServeConfig.from_yaml(str(p))
    assert cfg.groups == 3 and cfg.group.sp == 4 and cfg.group.num_gpus_per_rank == 1
    assert cfg.group.model == "/models/x.gguf"  # the top-level model reaches every group
    assert cfg.limits.max_sessions == 7 and cfg.api_keys == (ApiKey(hash_key("k"), "acme", True),)
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg  # what the Gateway receives as Serve args


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="unknown config keys \\['grpc_prot'\\]"):
        ServeConfig.from_dict({"grpc_prot": 1})


def test_app_builder_makes_a_serve_application():
    from ray.serve import Application

    from ringserve.cluster.serve_app import app_builder

    app = app_builder({"redis_url": "redis://localhost:6379/0", "groups": 2})
    assert isinstance(app, Application)
