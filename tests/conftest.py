"""Shared test settings: quiet transformers, never reach the network (explicit env values win)."""

import os
import signal

import pytest

# A suite started in the background (`pytest &`, nohup, a CI step without job control) inherits SIGINT
# ignored, and so would every command the tests start: the signal tests need Ctrl-C to be Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run tiny models: thousands of small ops, where OpenMP's spinning threads cost far more than
# they save on a small, busy machine. One thread here and in every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_thread_everywhere():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for a module of tiny-model runs: on a small, busy machine OpenMP's spinning
    threads make those runs many times slower than one thread does."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def no_compile():
    """gptqmodel wraps its dequantization in torch.compile; inductor's C++ build dominates a tiny test."""
    import torch._dynamo

    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = before
