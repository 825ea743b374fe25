"""The memory estimate and budget as plain arithmetic (server/budgets.py peak_bytes,
server/memory_budget.py); measured against real RSS in tests/reliability/test_memory_budget.py."""

from __future__ import annotations

import pytest

from layertap.server.budgets import FLOAT_BYTES, WORKING_FACTOR, model_cost, peak_bytes
from layertap.server.errors import LimitExceeded, QueueFull
from layertap.server.memory_budget import MemoryBudget, machine_memory, memory_budget
from layertap.server.settings import Settings
from layertap.server.spec import NodeSpec

MiB = 1 << 20


def node(name: str, *shape: int) -> NodeSpec:
    return NodeSpec(name, (1, *shape), "float32", "NCHW", "call_module", "Conv2d")


# 100 x 100 input; a wide early map, a narrow late one
COST = model_cost((100, 100), [node("wide", 64, 50, 50), node("late", 8, 10, 10)])
WIDE, LATE = FLOAT_BYTES * 64 * 50 * 50, FLOAT_BYTES * 8 * 10 * 10


def test_one_image_at_the_models_size() -> None:
    e = peak_bytes(COST, [[10_000]], ["late"], keep_maps=False, answer_itemsize=0, batch=4)
    assert e.parts["inputs and kept maps"] == FLOAT_BYTES * 3 * 10_000
    assert e.parts["forward"] == WORKING_FACTOR * WIDE + LATE  # the widest map up to "late"
    assert e.total == sum(e.parts.values()) and e.images == 1


def test_pixels_scale_every_part_and_tta_views_add_items() -> None:
    one = peak_bytes(COST, [[10_000]], ["late"], False, 0, 4)
    four_x = peak_bytes(COST, [[40_000]], ["late"], False, 0, 4)
    assert four_x.total == pytest.approx(4 * one.total, rel=0.01)
    views = peak_bytes(COST, [[10_000, 10_000, 40_000]], ["late"], False, 0, 4)
    assert views.total == pytest.approx(6 * one.total, rel=0.01)


def test_forwards_count_for_one_batch_and_kept_maps_for_every_image() -> None:
    many = peak_bytes(COST, [[10_000]] * 64, ["wide"], keep_maps=False, answer_itemsize=0, batch=4)
    assert many.parts["forward"] == 4 * (WORKING_FACTOR * WIDE + WIDE)
    kept = peak_bytes(COST, [[10_000]] * 64, ["wide"], keep_maps=True, answer_itemsize=4, batch=4)
    assert kept.parts["inputs and kept maps"] == 64 * (FLOAT_BYTES * 3 * 10_000 + WIDE)
    assert kept.parts["answer"] == 64 * 2 * WIDE  # the tensors, then the message
    half = peak_bytes(COST, [[10_000]] * 64, ["wide"], keep_maps=True, answer_itemsize=2, batch=4)
    assert half.parts["answer"] == 64 * WIDE  # float16 answers are half


def test_the_budget_refuses_by_cap_share_and_free_room_and_gives_back() -> None:
    budget = MemoryBudget(total=1000 * MiB, per_request=400 * MiB, client_share=0.5)
    big = peak_bytes(COST, [[10_000]] * 2000, ["wide"], True, 4, 4)
    assert big.total > 400 * MiB
    with pytest.raises(LimitExceeded, match="max_request_memory_bytes") as info:
        with budget.reserve(big, "a"):
            pass
    assert not isinstance(info.value, QueueFull)  # a limit: retrying cannot help
    fit = int(str(info.value).split("send at most ")[1].split()[0])
    assert peak_bytes(COST, [[10_000]] * fit, ["wide"], True, 4, 4).total <= 400 * MiB
    part = peak_bytes(COST, [[10_000]] * 150, ["wide"], True, 4, 4)  # about 300 MiB
    assert 250 * MiB < part.total < 400 * MiB
    with budget.reserve(part, "a"):
        with pytest.raises(QueueFull, match="client_queue_share"), budget.reserve(part, "a"):
            pass
        with budget.reserve(part, "b"), budget.reserve(part, "c"):
            with pytest.raises(QueueFull, match="memory budget is in use"):
                with budget.reserve(part, "d"):
                    pass
    assert budget.used == 0 and not budget._clients


def test_defaults_follow_the_machine() -> None:
    budget = memory_budget(Settings())
    assert budget.total == machine_memory() // 2 and budget.per_request == budget.total // 4
    set_ = memory_budget(Settings(memory_budget_bytes=8 * MiB, max_request_memory_bytes=64 * MiB))
    assert (set_.total, set_.per_request) == (8 * MiB, 8 * MiB)  # never above the budget
