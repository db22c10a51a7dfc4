"""Fixtures only (helpers live in ``prunelens.testing``): the tiny model of each architecture, the
tiny saved model, the real bundled default model, and the fast/slow split (``--runslow``)."""

from __future__ import annotations

import os

# Tests never reach a model or data hub: datasets and huggingface_hub read these at import, so they
# are set before anything imports them (subprocesses of the CLI tests inherit them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from typing import Any

import pytest
from torch import nn

from prunelens.model.loading import DEFAULT_MODEL, LoadedModel
from prunelens.prune.checkpoint import load_model
from prunelens.prune.drop import SkippedAttention, SkippedBlock, SkippedMLP
from prunelens.testing import ARCH_NAMES, save_tiny, tiny_model, tiny_tokenizer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow tests (real bundled model, sandbox, multi-process); RUN_SLOW=1 too")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


_MODELS: dict[str, nn.Module] = {}


@pytest.fixture(params=ARCH_NAMES)
def model(request: pytest.FixtureRequest) -> Iterator[nn.Module]:
    """One tiny model per architecture, built once per module; tests must leave it unchanged."""
    mt = request.param
    if mt not in _MODELS:
        _MODELS[mt] = tiny_model(mt)
    m = _MODELS[mt]
    before = {n: p.data_ptr() for n, p in m.named_parameters()}
    yield m
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == before, "test left the model modified"
    assert not any(isinstance(x, (SkippedAttention, SkippedBlock, SkippedMLP)) for x in m.modules())


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The real bundled default model, loaded once per session (tests using it are ``slow``)."""
    return load_model(DEFAULT_MODEL)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that loads the real model (through ``real_lm``) carries the ``slow`` marker; slow
    tests run only with ``--runslow`` or ``RUN_SLOW=1`` (as transformers' ``@slow``), so a bare
    ``pytest`` is the fast edit loop and CI runs both sets."""
    run_slow = config.getoption("--runslow") or os.environ.get("RUN_SLOW", "") not in ("", "0")
    skip = pytest.mark.skip(reason="slow: needs --runslow or RUN_SLOW=1")
    for item in items:
        if "real_lm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))
