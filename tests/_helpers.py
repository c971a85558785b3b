"""The test kit shared by the op families' tests: input makers, comparison helpers and skip
rules that were copied from file to file (the environment-wide fixtures and the backend lists
live in conftest.py; the integrations' kit in test_integrations_kit.py)."""

import pytest
import torch

IGNORE = -100  # the ignore_index of the log-prob ops


def skip_unsupported(device, backend, dtype):
    """Skip the case the Triton interpreter cannot run: bfloat16 arithmetic on CPU tensors."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bfloat16 arithmetic")


def make_labels(gen, lead, V, device, ignore_frac=0.25, dtype=torch.int64):
    """Labels of shape ``lead`` in [0, V), about ``ignore_frac`` of them IGNORE."""
    y = torch.randint(0, V, lead, generator=gen)
    y[torch.rand(lead, generator=gen) < ignore_frac] = IGNORE
    return y.to(dtype).to(device)


def maxerr(a, b):
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def tile_fixture(module, tiles, doc):
    """A fixture parametrized over ``tiles`` that sets ``module._TILE`` (the op's working-set
    budget) for the test: 0 is the backend's default; ``doc`` says what the others exercise."""
    @pytest.fixture(params=tiles, ids=lambda t: "tile%d" % t)
    def tile(request, monkeypatch):
        monkeypatch.setattr(module, "_TILE", request.param)
        return request.param
    tile.__doc__ = doc
    return tile
