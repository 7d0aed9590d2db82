"""Shared pieces of the benchmarks: device description, step timers, peak memory, FLOP counts.

Only torch (and the standard library) here, so the benchmarks run on a bare GPU machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by device name. First match wins, so the
# specific H100 variants come before the plain "H100" (SXM).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]

FLOP_FORMULA = (
    "flops_per_step = tokens * (6 * N_linear + 12 * n_layers * hidden * seq_len), where N_linear "
    "counts the weights of every nn.Linear of the base model (lm_head included, embeddings "
    "excluded) and tokens = micro_batch * seq_len (PaLM appendix B; attention counted without "
    "the causal half). Adapter FLOPs are not counted, so every variant has the same numerator "
    "and MFU ratios are inverse step-time ratios. mfu_frozen uses 4 * N_linear instead of 6: "
    "the base weights are frozen, so their weight gradients are never computed."
)


# ---- device ---------------------------------------------------------------------------------
def cpu_info() -> dict:
    """The first processor's entry of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    """The driver version from nvidia-smi (torch does not expose it); None when unavailable."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": name,
            "memory_bytes": props.total_memory,
            "driver": nvidia_driver(),
            "cuda": torch.version.cuda,
            "peak_bf16_flops": peak,
        }
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    return {
        "type": "cpu",
        "name": cpu_model(),
        # "AMD EPYC" alone says little; family/model pin the generation (25/17 is Zen 4, Genoa).
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "cores": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "peak_bf16_flops": None,
    }


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---- FLOPs ----------------------------------------------------------------------------------
def linear_weight_count(model: nn.Module) -> int:
    """Weights in the base model's nn.Linear modules (call before adapters are injected)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_step(n_linear: int, n_layers: int, hidden: int, seq_len: int, tokens: int, weight_factor: int = 6) -> float:
    return float(tokens) * (weight_factor * n_linear + 12 * n_layers * hidden * seq_len)


# ---- timing ---------------------------------------------------------------------------------
class StepTimer:
    """Times each call of a step function: CUDA events on a GPU (no host sync per step, so the
    queue stays full), perf_counter on the CPU (where ops run synchronously).

    On the CPU it also records the process CPU time of each step: on a machine shared with other
    work, wall time counts the time other processes held our cores, CPU time does not. With one
    torch thread the two agree on an idle machine; with more, idle OpenMP threads that spin
    count as CPU time too, so prefer ``--threads 1`` where the machine is shared.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def run(self, step: Callable[[], None]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            self._pending.append((start, end))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)

    def collect(self) -> list[float]:
        """Waits for the device and returns the step times (seconds) gathered so far."""
        if self.cuda:
            torch.cuda.synchronize()
            self.times.extend(start.elapsed_time(end) / 1e3 for start, end in self._pending)
            self._pending = []
        return self.times


def summarise(times: list[float]) -> dict:
    ordered = sorted(times)
    q = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]  # noqa: E731
    return {
        "steps": len(times),
        "median_s": statistics.median(times),
        "p10_s": q(0.10),
        "p90_s": q(0.90),
        "min_s": ordered[0],
        "max_s": ordered[-1],
    }


# ---- memory ---------------------------------------------------------------------------------
MEMORY_METHOD = {
    "cuda": "peak_step_bytes = torch.cuda.max_memory_allocated() during the variant's steps minus "
    "memory_allocated() before them (activations, gradients and temporaries above what is resident); "
    "resident_bytes = parameters + trainable gradients + optimizer state of the variant.",
    "cpu": "peak_step_bytes = peak of the torch CPU allocator's running total over one extra, untimed "
    "step, from torch.profiler memory events (profile_memory=True); the allocator's own accounting, "
    "like CUDA's max_memory_allocated. Process RSS is not used: glibc keeps freed blocks, so RSS "
    "deltas between variants in one process mean little; tracemalloc does not see torch tensors. "
    "resident_bytes as on CUDA.",
}


def cpu_step_peak_bytes(step: Callable[[], None]) -> int | None:
    """Peak extra bytes the torch CPU allocator holds during ``step()``; None if the profiler's
    memory events are not available in this torch."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):
        step()
        return None
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            total += event.nbytes()
            peak = max(peak, total)
    return peak


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    total += sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)  # grads
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def write_result(result: dict, path: "os.PathLike | str") -> None:
    """Write a benchmark's JSON result to ``path`` (folders made as needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {os.path.relpath(path)}")
