import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["SSLHUB_CACHE"] = tempfile.mkdtemp(prefix="sslhub-test-cache-")  # never the user's ~/.cache/sslhub
atexit.register(shutil.rmtree, os.environ["SSLHUB_CACHE"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the cores shared out, subprocesses included
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hub_server import WRITE_TOKEN, HubServer, client_constants  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a busy 2-core machine spinning OpenMP threads make tiny models 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Two classes of 24 RGB 32x32 PNG images, bright squares vs stripes on noise, one subfolder per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("squares", "stripes"):
        (root / label).mkdir()
        for i in range(24):
            image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            if label == "squares":
                image[8:24, 8:24] = 220
            else:
                image[:, ::4] = 180
            Image.fromarray(image).save(root / label / f"{i}.png")
    return root


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running ``HubServer`` (tests/test_hub_push.py); the client talks to it with ``HF_TOKEN`` = a write token and
    an empty cache."""
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token, an empty cache
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # LFS files go through the LFS batch API
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
        for name, value in client_constants().items():
            monkeypatch.setattr(constants, name, value)
        yield server
