"""The drafter's projections run on whichever kernel (oneDNN packed or F.linear) made its forward faster on this
machine at the step's row count: chosen once when the drafter loads, never per request, never at a wrong result."""

import time

import pytest
import torch

from specrec.drafting.model_drafter import DrafterConfig, PadDrafter
from specrec.models import packed


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed, "_packed_rows", {})
    monkeypatch.delenv("SPECREC_PACKED_WEIGHTS", raising=False)


def test_the_faster_kernel_is_kept_per_row_count():
    """A forward that is slow on packed weights at 1-2 rows and slow on F.linear from 4 rows on."""
    runs = []

    def forward(rows: int) -> None:
        runs.append((rows, packed._forced))
        time.sleep(0.003 if packed._forced == (rows <= 2) else 0)

    choice = packed.choose_kernel_by_rows(forward, repeats=3)
    assert choice == {"1 row": "dense", "2 rows": "dense", "4 rows": "packed", "8 rows": "packed",
                      "16 rows": "packed", "32 rows": "packed"}
    assert len(runs) == 6 * 2 * 4 and {kernel for _, kernel in runs} == {True, False}
    assert not packed.packed_for(1) and not packed.packed_for(2) and packed.packed_for(3)
    assert packed.packed_for(packed.TIMED_ROWS + 1) and packed._forced is None


def test_packed_weights_on_skips_the_timing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPECREC_PACKED_WEIGHTS", "on")
    runs = []
    choice = packed.choose_kernel_by_rows(runs.append)
    assert not runs and set(choice.values()) == {"packed"}


@pytest.mark.parametrize("kernel", ["packed", "dense"])
def test_either_kernel_computes_the_linear_layer(kernel: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packed, "_packed_rows", {4: kernel == "packed"})
    q, k = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.allclose(packed.packed_linear(q, x, timed=True), q(x), atol=1e-5)
        assert torch.allclose(packed.stacked_linear((q, k), x, timed=True), torch.cat([q(x), k(x)], -1), atol=1e-5)
    assert packed.is_packed(q) == (kernel == "packed")


def test_a_loaded_drafter_has_chosen_before_its_first_request():
    drafter = PadDrafter(DrafterConfig(level_sizes=(8, 8), dim=32, n_layers=1, n_heads=2, intermediate=48)).eval()
    choice = drafter.choose_kernels()
    assert list(choice) == ["1 row", "2 rows", "4 rows", "8 rows", "16 rows", "32 rows"]
    assert set(choice.values()) <= {"packed", "dense"} and packed._forced is None


def test_a_drafter_times_nothing_where_there_is_one_kernel(monkeypatch: pytest.MonkeyPatch):
    """Packed weights off (or missing here): nothing to choose, so loading spends no time on it."""
    monkeypatch.setattr(packed, "_available", {torch.float32: False})
    drafter = PadDrafter(DrafterConfig(level_sizes=(8, 8), dim=32, n_layers=1, n_heads=2, intermediate=48)).eval()
    assert drafter.choose_kernels() == {} and packed._packed_rows == {}
