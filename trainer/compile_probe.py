"""Whether torch.compile pays on this machine for this step: measured once, then read from the cache.

The gain of compiling the decoder layers depends on the CPU kind, the precision and the step, and
short comparisons disagree: +8% on a Zen without AVX512-BF16 (fp32 steps); on a Zen with it (bf16
steps) none in one 14-step comparison and +14% in a later 40-step one (docs/PERFORMANCE.md). So `torch_compile:
auto` measures it on the run's own first batch: forward and backward, eager and compiled alternated
in one process, and the compile itself timed. The numbers are kept in the machine cache
(contract/machine_cache.py) under the machine, the model's shape and the step's settings, and later
runs decide from them without measuring.
"""

from __future__ import annotations

import time

from contract.decisions import Decision
from contract.machine_cache import cached, machine_key, store, unkept_note

KIND = "compile_probe"  # the cache file's name
ROUNDS = 3  # compiled and eager steps alternated; the median of each
# Below this, a gain is within the noise of three alternated steps on a shared machine: not worth a compile.
MIN_GAIN = 0.02
# A run measures the gain only when it is estimated to last long enough that the measurement (about
# one compile and a few steps) is a small share of it, and that a gain like the best measured so far
# (8% after a 30 s compile, fp32 steps) would repay the compile.
MEASURE_AFTER_SECONDS = 375


def step_key(config, trainable: int, step_text: str) -> str:
    """The cache key: this machine, torch, the model's shape (its config), its trainable parameter count
    and what the step does (method, precision, attention kernel and its softmax, who draws the LoRA
    dropout masks, batch), everything the gain of compiling depends on."""
    import torch

    shape = (f"{config.model_type} {config.num_hidden_layers} layers x {config.hidden_size}/"
             f"{config.intermediate_size}, heads {config.num_attention_heads}/"
             f"{getattr(config, 'num_key_value_heads', config.num_attention_heads)}")
    return machine_key(f"torch {torch.__version__}", shape, f"{trainable} trainable", step_text)


def cached_gain(key: str) -> dict | None:
    return cached(KIND, key)


def measure(model, objective, batch, key: str) -> dict:
    """Time forward and backward of `batch` on the model whose layers `use_compile` has wrapped (torch
    compiles them at their first call): eager, compiled, then the two alternated; keep the numbers
    under `key` unless another program held the cores meanwhile. Gradients are dropped and torch's
    generator restored, so training starts exactly as it would have without the measurement."""
    import torch

    from trainer.devices import core_wait_share, scheduler_snapshot
    from trainer.performance import eager

    rng = torch.get_rng_state()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step_seconds() -> float:
        return forward_backward_seconds(model, objective, [batch], trainable)

    with eager():
        step_seconds()  # the first step pays one-time allocations
    first_compiled = step_seconds()  # compiles (its worker processes are not contention)
    before = scheduler_snapshot()
    eager_steps, compiled_steps = [], []
    for _ in range(ROUNDS):
        compiled_steps.append(step_seconds())
        with eager():
            eager_steps.append(step_seconds())
    torch.set_rng_state(rng)
    eager_s, compiled_s = _median(eager_steps), _median(compiled_steps)
    measured = {"eager_seconds": round(eager_s, 3), "compiled_seconds": round(compiled_s, 3),
                "compile_seconds": round(max(first_compiled - compiled_s, 0.0), 1),
                "gain": round(eager_s / compiled_s - 1, 4), "batch": list(batch.input_ids.shape)}
    contention = core_wait_share(before)
    if not store(KIND, key, measured, contention):
        measured["contention"] = contention  # the decision's reason says so
    return measured


def forward_backward_seconds(model, objective, batches: list, trainable: list) -> float:
    """Seconds of the forward and backward passes over `batches` (a step without its optimizer update);
    the gradients of `trainable` are dropped after, so the measurement leaves no trace in training."""
    start = time.perf_counter()
    for batch in batches:
        loss, _ = objective.loss(model, batch)
        loss.backward()
    for p in trainable:
        p.grad = None
    return time.perf_counter() - start


def decide(measured: dict, estimated_seconds: float, compiled_already: bool) -> Decision:
    """On or off from a measurement. When the layers were just compiled to measure, the compile is paid
    and any gain keeps them; otherwise the gain must repay the (first-time) compile within the run."""
    gain, compile_s = measured["gain"], measured["compile_seconds"]
    seen = (f"measured on this machine{' now' if compiled_already else ' (cached)'}: a step "
            f"{measured['compiled_seconds']:.2f} s compiled, {measured['eager_seconds']:.2f} s eager ({100 * gain:+.0f}%), "
            f"compile {compile_s:.0f} s{unkept_note(measured.get('contention'))}")
    if gain < MIN_GAIN:
        return Decision("off", f"{seen}: no gain")
    if compiled_already:
        return Decision("on", f"{seen}: the compile is paid, the faster steps stay")
    payback = compile_s / gain
    if estimated_seconds < payback:
        return Decision("off", f"{seen}: repaid only after ~{payback:,.0f} s, the run is estimated at "
                               f"{estimated_seconds:,.0f} s")
    return Decision("on", f"{seen}: repaid after ~{payback:,.0f} s, the run is estimated at {estimated_seconds:,.0f} s")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
