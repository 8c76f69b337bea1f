"""Bad input gets a clear error, not a traceback; the CLI streams an answer."""

import subprocess
import sys

import pytest

from helpers import TEXT, make_tiny_llama, write_gguf
from ringserve.cluster.cli import main
from ringserve.workers.engine import GenerationStats, ShardEngine
from ringserve.workers.loader import ModelLoadError, load_model
from ringserve.workers.protocol import ContextLimitError, PromptError
from ringserve.workers.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(p)
    return p


def test_missing_model_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/model")


def test_gguf_of_unsupported_architecture(tiny_dir, tmp_path):
    path = write_gguf(tiny_dir, tmp_path / "other.gguf", arch="gemma3")
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gemma3' is not supported"):
        load_model(path)


def test_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(bad)


def test_prompt_longer_than_configured_maximum(tiny_dir):
    loaded = load_model(tiny_dir)
    engine = ShardEngine(loaded, max_context=40)
    ids = loaded.tokenizer.encode(TEXT)[:50]
    with pytest.raises(ContextLimitError, match="50 tokens; the session holds 0, .* limit of 40 tokens"):
        engine.prefill("s", ids)
    assert engine.store.sessions() == []  # nothing half-created
    # a session that fits still works on the same engine, and generation stops at the limit: 29 + 1 prompt
    # tokens, one position kept for the end-of-turn token, so 9 answer tokens
    engine.prefill("s", ids[:29])
    stats = GenerationStats()
    out = list(engine.generate("s", ids[29:30], SamplingParams(max_tokens=100), stop_ids=frozenset(), stats=stats))
    assert len(out) == 9 and stats.stop_reason == "context"
    with pytest.raises(ContextLimitError, match="leaves no room for an answer"):
        list(engine.generate("s", ids[:10]))


def test_empty_prompt_and_bad_ids(tiny_dir):
    engine = ShardEngine(load_model(tiny_dir))
    with pytest.raises(PromptError, match="empty"):
        engine.prefill("s", [])
    with pytest.raises(PromptError, match=r"out of range \[0, \d+\): \[-1, 99999\]"):
        engine.prefill("s", [1, -1, 2, 99999])
    engine.prefill("s", [1, 2, 3])
    with pytest.raises(PromptError, match="empty"):
        list(engine.generate("s", []))


def test_bad_sampling_parameters():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number in \[0, 10\]"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "/no/such/dir", "hi"], "does not exist"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "--file", "/no/such/file.txt", "hi"], "cannot read --file"),
])
def test_cli_reports_errors_in_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err and "Traceback" not in err


def test_cli_prompt_too_long_with_file(tiny_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 5)
    assert main(["generate", "--model", str(tiny_dir), "--file", str(doc), "--max-context", "64", "hi"]) == 2
    assert "exceed the limit of 64 tokens" in capsys.readouterr().err


def test_cli_streams_on_tiny_model(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--max-tokens", "8", "--raw", "Ring attention"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.slow
def test_cli_entry_point_answers_with_default_model():
    r = subprocess.run([sys.executable, "-m", "ringserve.cluster.cli", "generate", "--max-tokens", "24",
                        "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
