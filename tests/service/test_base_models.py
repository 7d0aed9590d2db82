"""`worker.base_models`: a worker keeps the base model of its last generation for the next one,
lends it to one generation at a time, and lets it go when idle, for another model, or for a
training run."""

import gc
import threading
import time
import weakref

import pytest

pytest.importorskip("torch")

from mola import MolaConfig, get_mola_model  # noqa: E402
from worker.base_models import BaseModelCache, load_for_generation  # noqa: E402


class CountingLoader:
    """The real loader, counting what it loads."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, name, device, dtype):
        self.loaded.append(name)
        return load_for_generation(name, device, dtype)


def _lend_once(cache, name="tiny-llama", keep=60.0):
    with cache.lend(name, "cpu", None, keep) as (model, tokenizer):
        return weakref.ref(model), tokenizer


def test_the_next_generation_on_the_model_gets_the_same_one_without_loading():
    cache = BaseModelCache(loader := CountingLoader())
    first, tokenizer = _lend_once(cache)
    assert cache.idle == "tiny-llama"
    second, again = _lend_once(cache)
    assert first() is second() is not None and again is tokenizer
    assert loader.loaded == ["tiny-llama"]
    assert not first().training  # in eval mode, for generation
    cache.release()
    gc.collect()
    assert cache.idle is None and first() is None  # released: nothing holds the model


def test_another_model_lets_the_idle_one_go_before_it_loads():
    seen_when_loading = []

    def loader(name, device, dtype):
        gc.collect()
        seen_when_loading.append(kept_llama() is None)
        return load_for_generation(name, device, dtype)

    cache = BaseModelCache(loader)
    kept_llama = lambda: None  # noqa: E731 - nothing loaded yet
    kept_llama, _ = _lend_once(cache, "tiny-llama")
    _lend_once(cache, "tiny-qwen2")
    assert seen_when_loading == [True, True] and cache.idle == "tiny-qwen2"  # never two at once
    cache.release()


def test_not_kept_with_zero_seconds_nor_past_them():
    cache = BaseModelCache(loader := CountingLoader())
    gone, _ = _lend_once(cache, keep=0)
    gc.collect()
    assert cache.idle is None and gone() is None
    briefly, _ = _lend_once(cache, keep=0.2)
    assert cache.idle == "tiny-llama"
    deadline = time.monotonic() + 10
    while cache.idle is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    assert cache.idle is None and briefly() is None
    _lend_once(cache)
    assert loader.loaded == ["tiny-llama"] * 3
    cache.release()


def test_a_model_left_carrying_an_adapter_is_not_kept():
    cache = BaseModelCache(loader := CountingLoader())
    with pytest.raises(RuntimeError):
        with cache.lend("tiny-llama", "cpu", None, 60.0) as (model, _):
            get_mola_model(model, MolaConfig(experts="2"))
            raise RuntimeError("the generation failed with the adapter still on")
    assert cache.idle is None
    _lend_once(cache)
    assert loader.loaded == ["tiny-llama", "tiny-llama"]
    cache.release()


def test_a_generation_meanwhile_gets_its_own_model():
    cache = BaseModelCache(loader := CountingLoader())
    _lend_once(cache)
    with cache.lend("tiny-llama", "cpu", None, 60.0) as (outer, _):
        inner = []
        thread = threading.Thread(target=lambda: inner.append(_lend_once(cache)[0]()))
        thread.start()
        thread.join()
        assert inner[0] is not outer  # never the model another generation has its adapter on
    assert loader.loaded == ["tiny-llama", "tiny-llama"]
    assert cache.idle == "tiny-llama"  # one kept, the other let go
    cache.release()
