"""Fixtures every test group shares. The repository root is importable (`import model`, `import train_pretrain`,
`from scripts import ...`) because tests/ is a package: pytest puts its parent on sys.path."""
import os

import pytest
import torch
from transformers import AutoTokenizer

from tests import TOKENIZER

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped tokenizer (or $TINYMIND_TEST_TOKENIZER), loaded once for the whole run."""
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on 2 shared cores OpenMP hand-offs cost more than the ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
