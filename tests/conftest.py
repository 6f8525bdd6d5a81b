import os

import pytest

from ldm.tiny import build_checkpoint

# the suite runs in fp32 on every machine (dtype auto would be bf16 on a CPU with native bf16 units):
# its images are compared with diffusers' and with each other bit for bit; tests/test_dtype.py sets it back
os.environ["LDM_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def sd1_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("sd1"), "sd1", seed=0)


@pytest.fixture(scope="session")
def sd2_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("sd2"), "sd2", seed=1)


@pytest.fixture(scope="session")
def inpaint_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("inpaint"), "inpaint", seed=2)


@pytest.fixture(scope="session")
def sd1_pipe(sd1_dir):
    from pipelines.pipeline import Pipeline
    return Pipeline.from_pretrained(sd1_dir)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine now (for accelerate launch's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("sdxl"), "sdxl", seed=3)


@pytest.fixture(scope="session")
def refiner_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("sdxl-refiner"), "sdxl-refiner", seed=4)
