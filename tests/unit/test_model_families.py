"""Qwen2 (incl. -1M), Qwen3, Qwen3-MoE and Mistral-Nemo-shaped checkpoints against `transformers`,
from safetensors and from GGUF, with the context limits their configs support."""

import json
import logging
import math

import pytest
import torch

from helpers import (TEXT, make_tiny_model, model_check_context, model_greedy, model_logits, rel_err,
                     write_gguf)
from ringserve.workers.loader import ModelLoadError, config_from_hf, load_model, model_max_context
from ringserve.workers.model import ModelConfig, Transformer, rope_cos_sin
from ringserve.workers.moe import MoEFeedForward, moe_dense_ref

# name -> (family, make_tiny_model arguments)
FAMILIES = {
    "qwen2": ("qwen2", dict(tie=True, rope_theta=1e7)),  # q/k/v bias, tied head, the -1M θ
    "qwen3": ("qwen3", dict()),  # q/k norm, head_dim 16 with hidden 48 / 4 heads
    "qwen3_bias": ("qwen3", dict(attention_bias=True, seed=2)),  # bias on q, k, v and o (as llama's switch)
    "qwen3_moe": ("qwen3_moe", dict(layers=3, mlp_only_layers=[1])),  # MoE, dense, MoE
    "qwen3_moe_step2": ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=False, seed=3)),  # dense, MoE
    "mistral": ("mistral", dict(seed=1)),  # Nemo-style explicit head_dim, θ 1e6
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    family, kw = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(path, family, **kw)
    return request.param, path, hf


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_logits_and_greedy_match_transformers(tiny):
    name, path, hf = tiny
    loaded = load_model(path)
    c = loaded.config
    # the switches the family needs were read from its config
    assert c.qkv_bias == (name in ("qwen2", "qwen3_bias")) and c.o_bias == (name == "qwen3_bias")
    assert c.qk_norm == name.startswith("qwen3")
    if name != "qwen2":
        assert c.head_dim == 16 and c.n_heads * c.head_dim != c.dim
    # the same layers are sparse as in transformers
    ours_moe = [isinstance(b.feed_forward, MoEFeedForward) for b in loaded.model.layers]
    hf_moe = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert ours_moe == hf_moe and (any(ours_moe) == name.startswith("qwen3_moe"))

    ids = loaded.tokenizer.encode(TEXT)[:97]
    ours = model_logits(loaded, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4
    assert model_greedy(loaded, ids[:40], 32) == hf_greedy(hf, ids[:40], 32)


def test_safetensors_and_gguf_give_same_logits(tiny, tmp_path):
    name, path, _ = tiny
    st = load_model(path)
    gg = load_model(write_gguf(path, tmp_path / f"{name}.gguf"))
    family = FAMILIES[name][0]
    assert gg.config.arch == {"mistral": "llama", "qwen3_moe": "qwen3moe"}.get(family, family)
    for f in ("head_dim", "qkv_bias", "qk_norm", "n_experts", "n_experts_per_tok", "norm_topk_prob",
              "tie_word_embeddings", "rope_theta", "max_context"):
        assert getattr(gg.config, f) == getattr(st.config, f), f
    assert [gg.config.is_moe_layer(i) for i in range(gg.config.n_layers)] == \
        [st.config.is_moe_layer(i) for i in range(st.config.n_layers)]
    ids = st.tokenizer.encode(TEXT)[:61]
    assert gg.tokenizer.encode(TEXT)[:61] == ids  # the tokenizer rebuilt from GGUF metadata agrees
    assert rel_err(model_logits(gg, ids), model_logits(st, ids)) < 1e-5


def test_fused_expert_checkpoints_load_the_same(tmp_path):
    """transformers 5 keeps experts fused (gate_up_proj (X, 2Fx, E), down_proj (X, E, Fx)); a checkpoint
    stored that way loads to the same model as the per-expert one."""
    from safetensors.torch import load_file, save_file

    make_tiny_model(tmp_path, "qwen3_moe", layers=1, seed=4)
    per_expert = load_model(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    fused = {k: v for k, v in sd.items() if ".experts." not in k}
    X = per_expert.config.n_experts
    fused["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
        [sd[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], sd[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]])
        for e in range(X)])
    fused["model.layers.0.mlp.experts.down_proj"] = torch.stack(
        [sd[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(X)])
    save_file(fused, str(tmp_path / "model.safetensors"))
    ids = per_expert.tokenizer.encode(TEXT)[:31]
    assert rel_err(model_logits(load_model(tmp_path), ids), model_logits(per_expert, ids)) == 0


def test_qwen_tokenizer_from_gguf_normalizes_like_tokenizer_json(tmp_path):
    """Qwen's tokenizer.json applies NFC before its split; the GGUF rebuild ("qwen2" pre) must too."""
    make_tiny_model(tmp_path, "qwen3", layers=1)
    st = load_model(tmp_path)
    gg = load_model(write_gguf(tmp_path, tmp_path / "q.gguf"))
    text = "Cafe\u0301 2024: 12345 devices (ring) DON'T stop\r\n\tnow"  # a decomposed é
    assert gg.tokenizer.encode(text) == st.tokenizer.encode(text)
    assert st.tokenizer.encode("Cafe\u0301") == st.tokenizer.encode("Caf\u00e9")


# ------------------------------------------------------------------------- context limits, honestly

DCA = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}


@pytest.fixture(scope="module")
def qwen_1m(tmp_path_factory):
    """Qwen2.5-7B-Instruct-1M's context shape (θ 1e7, 1,010,000 positions, the DCA block) at tiny width."""
    path = tmp_path_factory.mktemp("qwen2-1m")
    hf = make_tiny_model(path, "qwen2", tie=True, rope_theta=1e7, max_positions=1_010_000,
                         dual_chunk_attention_config=DCA, seed=5)
    return path, hf


def test_1m_config_is_served_to_its_training_length(qwen_1m, caplog, tmp_path):
    path, hf = qwen_1m
    with caplog.at_level(logging.WARNING, logger="ringserve.loader"):
        loaded = load_model(path)
    said = [r.getMessage() for r in caplog.records if "Dual Chunk Attention" in r.getMessage()]
    assert len(said) == 1  # once, at load
    assert "served up to its training length (262,144) without Dual Chunk Attention" in said[0]
    assert loaded.config.rope_context == 1_010_000 and loaded.config.max_context == 262_144
    assert model_max_context(path) == 262_144  # what the gateway asks, without the weights
    # within the limit the model is exact at θ = 1e7
    ids = loaded.tokenizer.encode(TEXT)[:61]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert rel_err(model_logits(loaded, ids), ref) < 1e-4
    # a GGUF of it does not carry the DCA block; the Qwen length rule caps it the same
    gguf_path = write_gguf(path, tmp_path / "1m.gguf")
    assert model_max_context(gguf_path) == 262_144
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ringserve.loader"):
        assert load_model(gguf_path).config.max_context == 262_144
    assert sum("without Dual Chunk Attention" in r.getMessage() for r in caplog.records) == 1


def test_1m_session_past_the_limit_is_refused(qwen_1m):
    """A synthetic count check: the engine refuses 262,144 tokens before any compute, the error names
    the limit, and the gateway maps that refusal to FAILED_PRECONDITION."""
    import grpc

    from ringserve.cluster.gateway import _status_of

    loaded = load_model(qwen_1m[0])
    with pytest.raises(ValueError, match="262145 tokens.*limit of 262144 tokens") as refused:
        model_check_context(loaded, 262_145)
    code, msg = _status_of(refused.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "262144" in msg
    assert "without Dual Chunk Attention" in msg  # the reason, not just the number
    model_check_context(loaded, 262_144)  # a session may hold exactly the model's context
    # a configured max_context may lower the limit, never raise it without the override
    c = loaded.config
    assert c.context_limit(None) == 262_144 and c.context_limit(100_000) == 100_000
    with pytest.raises(ValueError, match="exceeds what this model supports, 262144 tokens .*Dual Chunk"):
        c.context_limit(1_000_000)
    assert c.context_limit(1_000_000, beyond_model=True) == 1_000_000


def _cfg(**kw):
    base = dict(model_type="qwen2", vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, max_position_embeddings=32768)
    return config_from_hf({**base, **kw})


def test_sliding_window_caps_the_context_only_where_layers_use_it():
    # Qwen2.5's own configs: a window declared but switched off
    assert _cfg(sliding_window=131072, use_sliding_window=False).max_context == 32768
    c = _cfg(sliding_window=4096, use_sliding_window=True, max_window_layers=2)
    assert c.max_context == 4096 and "layers 2..3 attend within a sliding window of 4,096" in c.context_note
    m = _cfg(model_type="mistral", sliding_window=4096)  # Mistral-7B-v0.1: every layer
    assert m.max_context == 4096 and "layers 0..3" in m.context_note
    assert _cfg(model_type="mistral", sliding_window=None).max_context == 32768  # Nemo


def test_real_configs_give_the_published_shapes_and_limits():
    """Dimensions of the released models' config.json files (no weights): head_dim, KV bytes/token,
    context, and Qwen3-30B-A3B's parameter count."""
    qwen3_06b = config_from_hf(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
        rope_theta=1000000, tie_word_embeddings=True))
    assert qwen3_06b.head_dim == 128 and qwen3_06b.max_context == 40960
    yarn = config_from_hf(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))
    assert yarn.max_context == 131072  # "128K with YaRN"
    a3b = config_from_hf(dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=262144, rope_theta=10000000))
    assert a3b.max_context == 262144 and a3b.kv_bytes_per_token() == 96 * 1024
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(a3b).parameters())
    assert abs(n / 30.5e9 - 1) < 0.01  # "30.5B in total"
    nemo = config_from_hf(dict(
        model_type="mistral", vocab_size=131072, hidden_size=5120, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=1024000,
        rope_theta=1000000.0, sliding_window=None))
    assert nemo.head_dim == 128 and nemo.n_heads * nemo.head_dim == 4096 != nemo.dim
    assert nemo.rope_context == 1_024_000 and nemo.max_context == 131_072  # the documented 128K
    assert "trained it for and documents 128K" in nemo.context_note
    qwen25_7b = _cfg(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, intermediate_size=18944)
    assert qwen25_7b.kv_bytes_per_token() == 56 * 1024 and qwen25_7b.qkv_bias


@pytest.mark.parametrize("model_type,extra,why", [
    ("gemma3", {}, "sliding-window"),
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}, "LongRoPE"),
    ("llama4", {}, "chunked"),
])
def test_unsupported_architectures_say_what_is_supported(tmp_path, model_type, extra, why):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 64, **extra}))
    with pytest.raises(ModelLoadError, match=f"model_type '{model_type}' is not supported") as e:
        load_model(tmp_path)
    assert why in str(e.value) and "qwen2, qwen3, qwen3_moe" in str(e.value)


def test_supported_family_with_unsupported_rope_is_a_load_error():
    with pytest.raises(ModelLoadError, match="qwen2: unsupported RoPE scaling type 'longrope'"):
        _cfg(rope_scaling={"rope_type": "longrope", "factor": 4.0})


# ------------------------------------------------------------------------------------- the parts


@pytest.mark.parametrize("norm", [True, False])
def test_moe_grouped_by_expert_equals_dense_reference(norm):
    cfg = ModelConfig(vocab_size=8, dim=24, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=8,
                      n_experts=6, n_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=norm)
    torch.manual_seed(0)
    ffn = MoEFeedForward(cfg)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(53, 24)
        y, ref = ffn(x), moe_dense_ref(ffn, x)
        weights, experts = ffn.route(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert experts.unique().numel() == 6  # every expert got tokens: all groups were exercised
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.ones(53))
    else:
        assert bool((weights.sum(-1) < 1).all())


def test_rope_angles_are_exact_at_a_million_positions():
    """θ = 1e7 at positions near 1M: cos/sin match a float64 computation; fp32 angles would not."""
    cfg = ModelConfig(vocab_size=8, dim=128, n_layers=1, n_heads=1, n_kv_heads=1, intermediate_size=8,
                      rope_theta=1e7, max_position_embeddings=1_010_000)
    pos = [1_000_003, 262_143, 17]
    cos, sin = rope_cos_sin(cfg, torch.tensor(pos))
    D = 128
    ref_cos = torch.tensor([[math.cos(p / 1e7 ** ((2 * (i % (D // 2))) / D)) for i in range(D)] for p in pos])
    ref_sin = torch.tensor([[math.sin(p / 1e7 ** ((2 * (i % (D // 2))) / D)) for i in range(D)] for p in pos])
    assert float((cos - ref_cos).abs().max()) < 1e-6 and float((sin - ref_sin).abs().max()) < 1e-6
    inv32 = 1.0 / (1e7 ** (torch.arange(0, D, 2).float() / D))
    naive = (torch.tensor(pos).float()[:, None] * inv32[None]).cos()
    assert float((naive - ref_cos[:, : D // 2]).abs().max()) > 1e-3  # why the angles are taken in float64


# --------------------------------------------------------------------------------- chat templates

# A Qwen3-style template written for this test: ChatML, a reasoning block stripped from earlier
# assistant turns, and the enable_thinking switch at the generation prompt.
QWEN3_STYLE = """{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=0) %}
{%- for m in messages[::-1] %}
{%- if m.role == 'user' and ns.last_user == 0 %}{%- set ns.last_user = messages|length - loop.index %}{%- endif %}
{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}
{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}
{%- elif m.role == 'assistant' %}
{%- set content = m.content %}
{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_user %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""


def test_qwen3_template_and_enable_thinking_match_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    make_tiny_model(tmp_path, "qwen3", layers=1)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": QWEN3_STYLE}))
    tok = load_model(tmp_path).tokenizer
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=QWEN3_STYLE)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"}]
    for thinking in (False, True):
        ours = tok.render_chat(msgs, enable_thinking=thinking)
        assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=thinking)
    # served default: thinking off (the empty block closes it), and earlier reasoning is not repeated
    default = tok.render_chat(msgs)
    assert default.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and "add them" not in default
    assert tok.encode_chat(msgs) == tok.encode(default, add_bos=False, special_tokens=True)  # a rendered template
    # a follow-up turn of a session renders the same tokens as the tail of the whole conversation
    turn = tok.encode_turn(msgs[3:])
    assert tok.decode(turn, skip_special=False) == "<|im_start|>user\nAnd 3+3?<|im_end|>\n" \
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
