"""The GPU memory model (benchmarks/gpu_memory.py) against what really happens, on CPU.

The model's counts are made on fake tensors; the truth here is the CPU allocator's own record (the profiler's
memory events) of the same tiny UNet + LoRA step on real tensors, fp32, with and without gradient
checkpointing. Allocations that would stay on the host on a GPU are left out of the truth: 8-byte 0-dim
scalars (Python numbers autograd keeps for backward) and checkpointing's saved RNG states.
"""
import contextlib
import functools
import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from sdlora.tiny import ARCHS

_spec = importlib.util.spec_from_file_location("gpu_memory", Path(__file__).parents[1] / "benchmarks" / "gpu_memory.py")
gm = importlib.util.module_from_spec(_spec)
sys.modules["gpu_memory"] = gm  # dataclasses look their module up
_spec.loader.exec_module(gm)

ROW = gm.Row("tiny", "tiny", 64)
NO_AUTOCAST = contextlib.nullcontext()


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _parts(checkpointing: bool, fake=None, arch: str = "tiny", dtype=torch.float32):
    """(unet, LoRA params, AdamW, batch) as `gm.predict` builds them: on `fake` (a FakeTensorMode), or real and
    filled with random numbers."""
    torch.manual_seed(0)
    unet = gm.lora_unet(ARCHS[arch]["unet"], dtype, 4)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    with fake or contextlib.nullcontext():
        gm.materialise(unet, "cpu", init=fake is None)
        params = [p for p in unet.parameters() if p.requires_grad]
        return unet, params, gm.make_optimizer(params, "adamw", foreach=True), gm.make_batch(unet, ROW, dtype, "cpu")


@functools.cache
def _predict(checkpointing: bool) -> dict:
    return gm.predict(gm.Row("tiny", "tiny", ROW.resolution, checkpointing=checkpointing), gpu=False)


def _device_allocations(fn) -> list[int]:
    """Run fn; the CPU allocator's allocations (+bytes) and frees (-bytes) in order, host-only ones left out."""
    from torch.profiler import ProfilerActivity, profile

    # the cyclic GC may free an earlier test's tensors mid-run; those frees are not this run's (CI saw one)
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
    host = {8, torch.get_rng_state().nbytes}
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return [e.nbytes() for e in events if abs(e.nbytes()) not in host]


def _forward(unet, batch):
    noisy = (batch["latents"] * 0.7 + batch["noise"] * 0.7).to(batch["text"].dtype)  # as train_step makes it
    return lambda: unet(noisy, batch["t"], batch["text"], return_dict=False)[0]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_saved_activations_are_what_the_allocator_keeps_after_the_forward(checkpointing):
    predicted = _predict(checkpointing)["saved_activations"]
    unet, _, _, batch = _parts(checkpointing)
    forward = _forward(unet, batch)
    out = []
    kept = sum(_device_allocations(lambda: out.append(forward())))
    assert predicted == kept - out[0].nbytes  # the forward keeps its saved tensors and its output, nothing else


def test_checkpointing_and_views_make_a_difference_here():
    """The comparison above can fail: on this UNet, forgetting checkpointing or counting the storage of each
    saved view on its own would change the count."""
    plain, ckpt = _predict(False)["saved_activations"], _predict(True)["saved_activations"]
    assert plain > 3 * ckpt
    unet, params, _, batch = _parts(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _forward(unet, batch)()
    skip = {StorageWeakRef(t.untyped_storage()) for t in [*unet.parameters(), batch["text"]]}
    per_tensor = sum(t.untyped_storage().nbytes() for t in saved if StorageWeakRef(t.untyped_storage()) not in skip)
    assert per_tensor > plain


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_peak_of_two_steps_is_the_allocators(checkpointing):
    predicted = _predict(checkpointing)
    unet, params, opt, batch = _parts(checkpointing)
    held = sum(t.nbytes for t in [*unet.parameters(), *torch.utils._pytree.tree_leaves(batch)])
    steps = lambda: [gm.train_step(unet, params, opt, batch, NO_AUTOCAST, foreach=True) for _ in range(2)]  # noqa: E731
    now = peak = 0
    for n in _device_allocations(steps):
        now += n
        peak = max(peak, now)
    # CPU kernels allocate scratch (convolution buffers) that fake tensors do not show, as cuDNN's workspaces
    # on a GPU (the model's margin); on this UNet it adds < 0.1 % at the peak
    assert abs(held + peak - predicted["peak"]) <= 0.05 * peak


def test_lora_params_grads_and_adamw_states_are_the_real_ones():
    predicted = _predict(False)
    unet, params, opt, batch = _parts(False)
    loss = _forward(unet, batch)().float().pow(2).mean()
    loss.backward()
    assert predicted["lora_params"] == sum(p.nbytes for p in params) > 0
    assert predicted["lora_grads"] == sum(p.grad.nbytes for p in params)
    opt.step()
    # AdamW's `step` counters are 0-dim (on the host on a GPU)
    states = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert predicted["optimizer_states"] == states == 2 * sum(p.nbytes for p in params)


def test_8bit_states_follow_bitsandbytes_rules():
    small, big = torch.empty(4, 320), torch.empty(4, 1280)  # 1280 elements (< 4096: fp32 states), 5120 (8-bit)
    assert gm.optimizer_state_bytes([small], "adamw8bit") == 2 * 256 * 4 + 2 * 1280 * 4
    assert gm.optimizer_state_bytes([big], "adamw8bit") == 2 * 256 * 4 + 2 * (5120 + 20 * 4)
    opt = gm.AdamW8bitStates([torch.nn.Parameter(big), torch.nn.Parameter(small)])
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    opt.step()
    made = [t for s in opt.state.values() for t in s.values()] + opt.qmaps
    assert sum(t.nbytes for t in made) == gm.optimizer_state_bytes(opt.param_groups[0]["params"], "adamw8bit")


# CUDA autocast's lists (torch/include/ATen/autocast_mode.h), as the aten ops they reach below autograd
CUDA_FP32 = {"native_group_norm", "native_layer_norm", "upsample_nearest2d", "_softmax", "_log_softmax", "exp",
             "log", "pow", "rsqrt", "reciprocal", "sum", "prod", "cumsum", "logsumexp", "softplus", "mse_loss",
             "_fused_rms_norm", "upsample_bilinear2d", "linalg_vector_norm", "erfinv", "expm1", "log1p"}
CUDA_FP16 = {"convolution", "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention"}


class _OpDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._opname
        dtypes = {t.dtype for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.is_floating_point()}
        self.seen.setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["tiny", "sdxl-tiny"])
def test_cuda_autocast_emulation_matches_cudas_lists(arch):
    """Under CPU fp16 autocast + CudaAutocast, every op the UNet runs that CUDA autocast runs in fp32 gets
    fp32 inputs only, and every op it runs in fp16 gets fp16 only (attention: CUDA's flash kernel)."""
    fake = _fake()
    unet, _, _, batch = _parts(False, fake, arch=arch, dtype=torch.float16)
    recorder = _OpDtypes()
    with fake:
        with gm.CudaAutocast(), torch.autocast("cpu", dtype=torch.float16), recorder:
            unet(batch["latents"].half(), batch["t"], batch["text"], **batch["extra"])
    fp32 = {op: d for op, d in recorder.seen.items() if op in CUDA_FP32}
    fp16 = {op: d for op, d in recorder.seen.items() if op in CUDA_FP16}
    assert {"native_group_norm", "native_layer_norm", "upsample_nearest2d"} <= set(fp32)
    assert {"convolution", "_scaled_dot_product_flash_attention"} <= set(fp16)
    assert all(d == {torch.float32} for d in fp32.values()), fp32
    assert all(d == {torch.float16} for d in fp16.values()), fp16


def test_gpu_prediction_runs_and_halves_the_activations():
    """The GPU path (fp16, CudaAutocast inside checkpointing's recomputation, flash attention, 512-byte blocks)."""
    row = gm.Row("tiny", "tiny", ROW.resolution, checkpointing=True)
    gpu, cpu = gm.predict(row, steps=1), _predict(True)
    assert gpu["weights"] < 0.6 * cpu["weights"] and gpu["saved_activations"] < cpu["saved_activations"]
    assert gpu["predicted"] > gpu["peak"] > gpu["weights"] + gpu["saved_activations"]
    assert row.name in gm.table([{**vars(row), **gpu}])


def _stepped_state_bytes(opt, params) -> int:
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    made = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return sum(t.nbytes for t in made + getattr(opt, "shared", []))


@pytest.mark.parametrize("kind", ["prodigy", "adafactor"])
def test_prodigy_and_adafactor_states_are_the_libraries(kind):
    """The rows' state bytes (from shapes) are what prodigyopt's and transformers' optimizers really allocate, on
    LoRA-shaped parameters (linear, conv, a DoRA-like vector, one of 4096+ elements)."""
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    shapes = [(4, 320), (320, 4), (4, 320, 3, 3), (1280,), (5000, 4)]
    # not all zeros: prodigyopt keeps a 0-dim p0 for a parameter that is (as LoRA's B matrices first are), which the
    # row counts in full (an upper bound)
    params, fakes = ([torch.nn.Parameter(torch.randn(s)) for s in shapes] for _ in range(2))
    real = Prodigy(params, lr=1.0) if kind == "prodigy" else Adafactor(params, lr=None)
    predicted = gm.optimizer_state_bytes(params, kind)
    assert _stepped_state_bytes(real, params) == predicted > 0
    assert _stepped_state_bytes(gm.StatesOf(fakes, kind), fakes) == predicted


def test_cuda_autocast_emulation_covers_the_mmdit():
    """SD3's MMDiT (joint attention over both streams, adaLN's layer norms, qk RMS norm) in bf16, as the SD3 rows
    run it: the ops CUDA's autocast runs in fp32 get fp32 only, its lower-precision ops bf16 only, and the joint
    attention reaches CUDA's flash kernel."""
    row = gm.Row("tiny sd3", "sd3", 64, dtype="bf16")
    model = gm.lora_model(row, torch.bfloat16)
    recorder = _OpDtypes()
    with _fake():
        gm.materialise(model, "cpu", init=False)
        batch = gm.make_batch(model, row, torch.bfloat16, "cpu")
        with gm.CudaAutocast(), recorder:
            gm.forward_loss(model, batch, torch.autocast("cpu", dtype=torch.bfloat16))
    fp32 = {op: d for op, d in recorder.seen.items() if op in CUDA_FP32}
    low = {op: d for op, d in recorder.seen.items() if op in CUDA_FP16}
    assert {"native_layer_norm", "rsqrt"} <= set(fp32) and {"_scaled_dot_product_flash_attention", "addmm"} <= set(low)
    assert all(d == {torch.float32} for d in fp32.values()), fp32
    assert all(d == {torch.bfloat16} for d in low.values()), low
