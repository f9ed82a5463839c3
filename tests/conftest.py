import os

# Pin the math libraries' thread pools before torch is imported, here and (through the environment)
# in every process a test starts (spawned ranks, CLI subprocesses): on a shared or busy machine more
# threads than free cores make each test much slower.  VBPC_TEST_THREADS overrides the count.
_THREADS = os.environ.get("VBPC_TEST_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = _THREADS
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(_THREADS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: modules whose every test is marked slow and whose imports alone take seconds (Lightning,
#: transformers.Trainer): `-m "not slow"` does not even import them.
_SLOW_MODULES = frozenset({"test_hf_trainer.py", "test_lightning.py"})


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in _SLOW_MODULES and config.getoption("markexpr", "").replace(" ", "") == "notslow":
        return True
    return None
