"""Denoisers: diffusers U-Nets with optimizer and EMA that survive a save/load round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from collafuse_flwr.config import ConfigError
from collafuse_flwr.diffusion import models
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser, on_device, resolve_device
from collafuse_flwr.diffusion.training import train_for_images


def _loss(net, x, g, c=None):
    t = torch.randint(0, 100, (x.shape[0],), generator=g)
    return (net(x, t).sample - x).pow(2).mean()


def test_training_counts_images_and_updates_the_ema(tmp_path):
    denoiser = Denoiser(build_denoiser(8, 1, (8, 16)), lr=1e-2, ema_decay=0.9)
    data = torch.randn(50, 1, 8, 8)
    before = [p.clone() for p in denoiser.net.parameters()]
    stats = train_for_images(denoiser, data, 70, 32, _loss, torch.Generator().manual_seed(0))
    assert stats["images-seen"] == 70 and stats["steps"] == 3  # 32 + 18 (end of pass) + 20
    ema_net = denoiser.for_sampling()
    moved = [p for p, q in zip(denoiser.net.parameters(), before) if not torch.equal(p, q)]
    assert moved
    assert any(
        not torch.equal(e, p) for e, p in zip(ema_net.parameters(), denoiser.net.parameters())
    )


def test_save_and_load_round_trip(tmp_path):
    denoiser = Denoiser(build_denoiser(8, 1, (8, 16)), lr=1e-2, ema_decay=0.9)
    train_for_images(denoiser, torch.randn(40, 1, 8, 8), 40, 20, _loss, torch.Generator().manual_seed(0))
    (tmp_path / "model.tmp").mkdir()  # a stale temporary from an interrupted save
    denoiser.save(tmp_path / "model")
    denoiser.save(tmp_path / "model")  # overwrite in place
    loaded = Denoiser.load(tmp_path / "model", lr=1e-2, ema_decay=0.9)
    for a, b in zip(loaded.net.parameters(), denoiser.net.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(loaded.for_sampling().parameters(), denoiser.for_sampling().parameters()):
        assert torch.equal(a, b)
    assert loaded.ema.optimization_step == denoiser.ema.optimization_step
    state = loaded.optimizer.state_dict()["state"]
    assert state and all(int(s["step"]) == 2 for s in state.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_fedavg_state_round_trips_weights_and_ema():
    a = Denoiser(build_denoiser(8, 1, (8, 16), seed=0), 1e-3, 0.99)
    b = Denoiser(build_denoiser(8, 1, (8, 16), seed=1), 1e-3, 0.99)
    with torch.no_grad():
        for shadow in a.ema.shadow_params:
            shadow.mul_(0.5)
    b.load_state(a.state())
    for (name, value), other in zip(a.state().items(), b.state().values()):
        assert torch.equal(value, other), name
    sampled = b.sampling_state()
    names = [n for n, _ in b.net.named_parameters()]
    assert all(torch.equal(sampled[f"net.{n}"], a.state()[f"ema.{n}"]) for n in names)


def _fedavg_round(start: dict, counter: int, trajectory: list[list[torch.Tensor]]) -> torch.Tensor:
    """The EMA (flattened) of a FedAvg client that loads `start` with its EMA step count at
    `counter` and whose weights then pass through `trajectory` (one list of parameters per
    optimizer step), the EMA updated after each step as in training."""
    denoiser = Denoiser(build_denoiser(8, 1, (8, 16)), 1e-3, 0.995)
    denoiser.ema.optimization_step = counter
    denoiser.load_state(start)
    for weights in trajectory:
        with torch.no_grad():
            for p, value in zip(denoiser.net.parameters(), weights, strict=True):
                p.copy_(value)
        denoiser.after_step()
    return torch.cat([v.flatten() for k, v in denoiser.state().items() if k.startswith("ema.")])


@pytest.mark.parametrize("counters,exact", [((0, 0), True), ((50, 50), True), ((2000, 5000), True),
                                            ((1, 50), False)])
def test_the_average_of_the_emas_is_the_ema_of_the_averaged_steps_only_with_equal_decays(counters, exact):
    """Two FedAvg clients start a round from the same weights and EMA and take 5 steps each. The
    average of their EMAs equals the EMA of the averaged steps when both apply the same decays:
    the same EMA step count, or counts both past the warm-up (n >= (10 d - 1) / (1 - d), 1,790
    steps at d = 0.995). With counts 1 and 50 the decays differ and it is off by a quarter or
    more of the round's EMA movement, whichever count the reference EMA uses."""
    g = torch.Generator().manual_seed(0)
    start = Denoiser(build_denoiser(8, 1, (8, 16)), 1e-3, 0.995).state()
    start = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.startswith("ema.") else v for k, v in start.items()}
    params = [p.detach() for p in build_denoiser(8, 1, (8, 16)).parameters()]  # the start's weights (seed 0)
    steps = [[[p + 0.01 * (s + 1) * torch.randn(p.shape, generator=g) for p in params] for s in range(5)]
             for _ in counters]
    averaged = [[(a + b) / 2 for a, b in zip(*step, strict=True)] for step in zip(*steps, strict=True)]
    mean_of_emas = sum(_fedavg_round(start, c, t) for c, t in zip(counters, steps, strict=True)) / 2
    ema_before = torch.cat([v.flatten() for k, v in start.items() if k.startswith("ema.")])
    for counter in sorted(set(counters)):
        ema_of_mean = _fedavg_round(start, counter, averaged)
        off = float((mean_of_emas - ema_of_mean).norm() / (ema_of_mean - ema_before).norm())
        assert off < 1e-4 if exact else off > 0.25


def test_device_values_are_checked_against_this_machine():
    assert resolve_device("server-device", "cpu") == torch.device("cpu")
    assert resolve_device("server-device", "auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="client-device='cuda:1': this process sees 0 CUDA device"):
            resolve_device("client-device", "cuda:1")


def test_a_denoiser_off_the_cpu_takes_and_returns_cpu_tensors():
    """The I/O hooks of a denoiser on an accelerator (no GPU here: the `meta` device stands in
    for the inputs' way; the output's way back is checked on the hook itself)."""
    net = on_device(build_denoiser(8, 1, (8, 16)), "meta")
    assert net._forward_pre_hooks and net._forward_hooks
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    args, kwargs = models._inputs_to_net(net, (x, t), {"return_dict": True})
    assert [a.device.type for a in args] == ["meta", "meta"] and kwargs == {"return_dict": True}
    assert net._caller_device == torch.device("cpu")
    output = UNet2DOutput(sample=torch.ones(2, 1, 8, 8))
    assert models._output_to_caller(net, args, output).sample.device == torch.device("cpu")
    assert not on_device(build_denoiser(8, 1, (8, 16)), "cpu")._forward_pre_hooks  # no hooks on the CPU
