import os
import sys

import pytest

# tests import their helpers as a plain module
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' own reading of the default model's GGUF, the reference oracle: loaded once per run (it
    takes ~15 s) for the unit and integration modules that compare with it."""
    import torch
    from transformers import AutoModelForCausalLM

    from ringserve.workers.loader import default_model_path

    p = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
