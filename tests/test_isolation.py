"""Isolation under stress: many threads and asyncio tasks building models at once, in and out of blocks.

Every model must be exactly what its own thread or task asked for (compared with a reference built alone), and
nothing built outside a block may be quantized or land on meta. Models are built step by step with a yield point
between submodules (``time.sleep(0)`` for threads, ``await asyncio.sleep(0)`` for tasks) so builds really interleave.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
import torch
from aqlm import QuantizedLinear
from torch import nn

from aqlm_ctx import AqlmConfig, aqlm_quantized

from .utils import signature

HIDDEN, VOCAB = 16, 32


def _is_fc(path: str, module: nn.Module) -> bool:
    return path.endswith(".fc")


# (config, skip): each a different format and a different kind of skip pattern.
RECIPES: list[tuple[AqlmConfig, list[Any]]] = [
    (AqlmConfig(num_codebooks=2, nbits_per_codebook=8), ["head"]),
    (AqlmConfig(), ["blocks.0"]),
    (AqlmConfig(in_group_size=16, nbits_per_codebook=8), ["re:blocks\\.1\\..*"]),
    (AqlmConfig(out_group_size=2, nbits_per_codebook=4), ["*.q"]),
    (AqlmConfig(num_codebooks=3, nbits_per_codebook=6, dtype=torch.bfloat16), [_is_fc]),
    (AqlmConfig(in_group_size=4, nbits_per_codebook=2), ["head.weight", "blocks.1.q"]),
]


def build_steps(tag: int) -> Generator[None, None, nn.Module]:
    """Build a small model one submodule at a time, yielding between submodules. ``tag`` varies the shape."""
    root = nn.Module()
    root.embed = nn.Embedding(VOCAB, HIDDEN)
    yield
    root.blocks = nn.ModuleList()
    for _ in range(2):
        block = nn.Module()
        block.q = nn.Linear(HIDDEN, HIDDEN)
        yield
        block.fc = nn.Linear(HIDDEN, HIDDEN * (1 + tag % 2), bias=False)
        yield
        root.blocks.append(block)
    root.norm = nn.LayerNorm(HIDDEN)
    root.head = nn.Linear(HIDDEN, VOCAB, bias=tag % 3 == 0)
    yield
    return root


def run_sync(steps: Generator[None, None, nn.Module], pause: Callable[[], None] = lambda: None) -> nn.Module:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        pause()


async def run_async(steps: Generator[None, None, nn.Module]) -> nn.Module:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await asyncio.sleep(0)


def build_alone(recipe: int | None, tag: int) -> nn.Module:
    if recipe is None:
        return run_sync(build_steps(tag))
    config, skip = RECIPES[recipe]
    with aqlm_quantized(config, skip=skip):
        return run_sync(build_steps(tag))


@pytest.fixture(scope="module")
def references() -> dict[tuple[int | None, int], dict[str, Any]]:
    return {
        (recipe, tag): signature(build_alone(recipe, tag))
        for recipe in [None, *range(len(RECIPES))]
        for tag in range(6)
    }


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads far more often than the default 5 ms, so that builds overlap finely."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def snapshot() -> tuple[dict[str, object], dict[str, object]]:
    return dict(vars(nn.Linear)), dict(vars(nn.Module))


def assert_restored(before: tuple[dict[str, object], dict[str, object]]) -> None:
    for now, then in zip(snapshot(), before, strict=True):
        assert now.keys() == then.keys()
        assert all(now[key] is then[key] for key in then)
    assert torch.nn.modules.module._global_module_registration_hooks == {}
    plain = nn.Linear(16, 8)
    assert type(plain) is nn.Linear and plain.weight.device.type == "cpu"
    assert torch.empty(1).device.type == "cpu"


def assert_ordinary(model: nn.Module) -> None:
    """Nothing quantized, nothing on meta."""
    assert not any(isinstance(module, QuantizedLinear) for module in model.modules())
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def check_model(
    model: nn.Module, recipe: int | None, tag: int, references: dict[tuple[int | None, int], dict[str, Any]]
) -> str | None:
    """``None`` if ``model`` is what (recipe, tag) asks for, else a description of the difference."""
    if recipe is None and (
        any(isinstance(m, QuantizedLinear) for m in model.modules())
        or any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()])
    ):
        return f"plain model (tag {tag}) has quantized or meta parts"
    if signature(model) != references[(recipe, tag)]:
        return f"model for recipe {recipe}, tag {tag} differs from the one built alone"
    return None


THREADS, MODELS_PER_THREAD = 16, 50


def test_threads_building_at_once_each_get_their_own_models(references: Any, fast_switching: None) -> None:
    before = snapshot()
    barrier = threading.Barrier(THREADS + 2)  # the workers plus two threads that die inside a block
    errors: list[str] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(10)
            for step in range(MODELS_PER_THREAD):
                tag = (index + step) % 6
                recipe = None if (index + step) % 2 else (index * 7 + step) % len(RECIPES)
                if recipe is None:
                    model = run_sync(build_steps(tag), lambda: time.sleep(0))
                    plain = torch.zeros(2)  # ordinary tensors stay ordinary while others have blocks open
                    if plain.device.type != "cpu":
                        errors.append(f"thread {index}: torch.zeros landed on {plain.device}")
                else:
                    config, skip = RECIPES[recipe]
                    with aqlm_quantized(config, skip=skip):
                        model = run_sync(build_steps(tag), lambda: time.sleep(0))
                if (problem := check_model(model, recipe, tag, references)) is not None:
                    errors.append(f"thread {index}, model {step}: {problem}")
        except Exception as error:  # reported below; a thread's exception would otherwise be lost
            errors.append(f"thread {index}: {error!r}")

    def dies_inside() -> None:
        barrier.wait(10)
        aqlm_quantized(RECIPES[0][0]).__enter__()  # never exited: the thread ends with the block open
        nn.Linear(16, 16)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    threads += [threading.Thread(target=dies_inside) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    # The dead threads' blocks affect nobody; the next block to close removes every patch.
    assert_ordinary(run_sync(build_steps(0)))
    with aqlm_quantized(RECIPES[0][0]):
        pass
    assert_restored(before)


def test_thread_dying_inside_a_block_leaves_nothing_for_the_others(references: Any) -> None:
    before = snapshot()
    entered = threading.Event()

    def dies_inside() -> None:
        context = aqlm_quantized(RECIPES[1][0])
        context.__enter__()
        nn.Linear(16, 16)
        entered.set()
        return  # the thread ends with the block still open

    dead = threading.Thread(target=dies_inside)
    dead.start()
    entered.wait(10)
    dead.join(10)
    assert not dead.is_alive()
    # Others get ordinary models while the dead thread's patch may still be installed ...
    model = run_sync(build_steps(1))
    assert_ordinary(model)
    assert check_model(model, None, 1, references) is None
    # ... and blocks of other threads work exactly as if it had never existed.
    results: list[nn.Module] = []
    other = threading.Thread(target=lambda: results.append(build_alone(2, 3)))
    other.start()
    other.join(10)
    assert check_model(results[0], 2, 3, references) is None
    with aqlm_quantized(RECIPES[0][0], skip=RECIPES[0][1]):
        mine = run_sync(build_steps(4))
    assert check_model(mine, 0, 4, references) is None
    assert_restored(before)


TASKS, MODELS_PER_TASK = 16, 12


def test_asyncio_tasks_interleaving_inside_blocks_each_get_their_own_models(references: Any) -> None:
    before = snapshot()

    async def task(index: int) -> list[str]:
        errors = []
        for step in range(MODELS_PER_TASK):
            tag = (index + step) % 6
            recipe = None if (index + step) % 2 else (index * 5 + step) % len(RECIPES)
            if recipe is None:
                model = await run_async(build_steps(tag))
                if torch.zeros(2).device.type != "cpu":
                    errors.append(f"task {index}: torch.zeros landed on meta outside a block")
            else:
                config, skip = RECIPES[recipe]
                with aqlm_quantized(config, skip=skip):
                    model = await run_async(build_steps(tag))  # other tasks run at every submodule
            if (problem := check_model(model, recipe, tag, references)) is not None:
                errors.append(f"task {index}, model {step}: {problem}")
        return errors

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(task(i) for i in range(TASKS)))

    assert [error for errors in asyncio.run(main()) for error in errors] == []
    assert_restored(before)


def test_asyncio_nested_blocks_in_tasks_interleave(references: Any) -> None:
    """Each task opens an outer block and, at an await point, a nested one with another recipe."""
    before = snapshot()

    async def task(index: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        outer, inner = index % len(RECIPES), (index + 1) % len(RECIPES)
        with aqlm_quantized(RECIPES[outer][0], skip=RECIPES[outer][1]):
            first = await run_async(build_steps(index))
            with aqlm_quantized(RECIPES[inner][0], skip=RECIPES[inner][1]):
                second = await run_async(build_steps(index))
            await asyncio.sleep(0)
        plain = await run_async(build_steps(index))
        return first, second, plain

    async def main() -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        return await asyncio.gather(*(task(i) for i in range(12)))

    for index, (first, second, plain) in enumerate(asyncio.run(main())):
        assert check_model(first, index % len(RECIPES), index % 6, references) is None
        assert check_model(second, (index + 1) % len(RECIPES), index % 6, references) is None
        assert check_model(plain, None, index % 6, references) is None
    assert_restored(before)


def test_a_context_copied_inside_a_block_is_ordinary_once_the_block_ends() -> None:
    """``contextvars.copy_context()`` (what a task started in the block keeps) does not carry an ended block, even
    while another thread holds one (the process-wide patch is on)."""
    with aqlm_quantized(AqlmConfig()):
        copied = contextvars.copy_context()
        assert type(copied.run(nn.Linear, 16, 16)) is QuantizedLinear  # while the block is open
    entered, release = threading.Event(), threading.Event()

    def hold_a_block() -> None:
        with aqlm_quantized(AqlmConfig()):
            entered.set()
            release.wait()

    other = threading.Thread(target=hold_a_block)
    other.start()
    try:
        entered.wait()
        layer = copied.run(lambda: nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)))
    finally:
        release.set()
        other.join()
    assert_ordinary(layer)


def test_a_task_started_in_a_block_is_ordinary_once_the_block_ends() -> None:
    async def main() -> tuple[nn.Module, nn.Module]:
        go = asyncio.Event()

        async def build_later() -> nn.Module:
            await go.wait()
            return nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))

        with aqlm_quantized(AqlmConfig()):
            background = asyncio.create_task(build_later())
            inside = nn.Linear(16, 16)
        with aqlm_quantized(AqlmConfig()):  # a later block of this task: not the background task's
            go.set()
            return inside, await background

    inside, later = asyncio.run(main())
    assert type(inside) is QuantizedLinear
    assert_ordinary(later)


def test_the_innermost_of_blocks_and_device_contexts_places_tensors() -> None:
    """As with nested ``torch.device`` contexts, the innermost wins: a block inside ``torch.device("cpu")`` inside
    another block puts tensors on meta, as it does alone."""

    def library_factory() -> nn.Module:
        with torch.device("cpu"), aqlm_quantized(AqlmConfig()):
            return nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))

    with aqlm_quantized(AqlmConfig()):
        nested = library_factory()
        with torch.device("cpu"):
            assert torch.empty(1).device.type == "cpu"  # a device context inside the block wins there
    assert {p.device.type for p in library_factory()[1].parameters()} == {"meta"}
    assert {p.device.type for p in nested[1].parameters()} == {"meta"}


def test_another_tasks_block_leaves_this_tasks_device_context_alone() -> None:
    """Task X opens a block and, inside it, ``torch.device("cpu")``; task Y of the same thread then opens a block:
    X's tensors still go where X's innermost context says (cpu), Y's to meta."""

    async def main() -> tuple[str, str]:
        y_open, x_done = asyncio.Event(), asyncio.Event()

        async def task_x() -> str:
            with aqlm_quantized(AqlmConfig()), torch.device("cpu"):
                await y_open.wait()
                device = torch.empty(2).device.type
            x_done.set()
            return device

        async def task_y() -> str:
            await asyncio.sleep(0)
            with aqlm_quantized(AqlmConfig()):
                y_open.set()
                device = torch.empty(2).device.type
                await x_done.wait()
            return device

        x, y = await asyncio.gather(task_x(), task_y())
        return x, y

    assert asyncio.run(main()) == ("cpu", "meta")
