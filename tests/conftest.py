import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes import common/, models/

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cli_runs(*keys): recipe command lines a test reads (started up front)"
    )


@pytest.fixture(autouse=True, scope="session")
def _kernel_choices(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Kernel rankings measured during tests (tiny shapes, a loaded machine) stay out of the
    user's cache, where they would decide for real runs of the same size class."""
    from common import ops

    ops.reset(tmp_path_factory.mktemp("ops") / "kernel_choices.json")


@pytest.fixture
def fresh_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each compile test from scratch: its own inductor cache and kernel choices, dynamo's
    compiled graphs and counters reset."""
    from common import ops

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ops.reset(tmp_path / "choices.json")
    torch._dynamo.reset()
    yield
    ops.reset()
