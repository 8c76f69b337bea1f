"""GPU tests: run on a CUDA machine, skipped elsewhere with the reason a user would expect."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA")
    for item in items:
        if "tests/gpu" in str(item.fspath):
            item.add_marker(skip)
