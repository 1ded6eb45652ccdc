"""Every run-config value outside what the run can take fails at validation, naming the key."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from collafuse_flwr.config import (
    INT_RANGES,
    MAX_UNET_CHANNELS,
    MAX_UNET_LEVELS,
    MAX_UNET_PARAMETERS,
    ConfigError,
    RunConfig,
    unet_parameters,
)
from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.run_dir import check_output_dir


def refused(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(override)


def test_every_integer_key_has_an_upper_bound():
    """An integer key is in INT_RANGES or bounded by another key (checked below)."""
    integers = {k for k, v in RunConfig().to_flower().items() if type(v) is int}
    assert integers - set(INT_RANGES) == {"t-zeta", "eval-num-samples", "min-replies"}


@pytest.mark.parametrize("key", sorted(INT_RANGES))
def test_integers_above_their_bound_name_the_bound(key):
    low, high = INT_RANGES[key]
    refused({key: high + 1}, rf"^{key}={high + 1}: must be >= {low} and <= {high}$")


@pytest.mark.parametrize("key,value", [("seed", 2**64), ("seed", -1), ("timesteps", 10**9), ("image-size", 2**20),
                                       ("batch-size", 10**7), ("num-clients", 10**6), ("eval-every", 10**30)])
def test_absurd_values_from_the_field(key, value):
    refused({key: value}, rf"^{key}={value}: must be >= \d+ and <= \d+$")


def test_the_largest_seed_is_taken_by_every_consumer():
    """torch and numpy accept every seed derived from the largest run seed."""
    seed = INT_RANGES["seed"][1]
    config = RunConfig.from_flower({"seed": seed, "num-clients": INT_RANGES["num-clients"][1]})
    torch.Generator().manual_seed(config.seed + 1 + config.num_clients - 1)  # a client's initial weights
    np.random.default_rng([config.seed, config.num_clients - 1]).permutation(3)
    np.random.SeedSequence([config.seed, 7, 3]).generate_state(1)
    assert config.seed == 2**63 - 1  # Flower's run config carries signed 64-bit integers


def test_bounds_hold_at_their_edges():
    config = RunConfig.from_flower({"timesteps": 100_000, "sampling-steps": 100_000, "t-zeta": 100_000,
                                    "image-size": 1024, "client-lr": 1.0, "server-lr": 1e-9})
    assert (config.timesteps, config.image_size, config.client_lr) == (100_000, 1024, 1.0)
    refused({"timesteps": 100_000, "sampling-steps": 100_001}, r"sampling-steps=100001: must be >= 1 and <= 100000")


@pytest.mark.parametrize("value", [2.0, 10**400])
def test_learning_rates_are_at_most_one(value):
    message = "must be > 0 and <= 1.0" if value == 2.0 else "must be a finite number"
    refused({"client-lr": value}, rf"client-lr={re.escape(repr(value))}: {message}")


@pytest.mark.parametrize("override,message", [
    ({"eval-num-samples": 50_001, "max-uploads-per-client": 100_000}, r"eval-num-samples=50001: .* <= 50000"),
    ({"eval-num-samples": 200, "max-uploads-per-client": 100}, r"\[2, max-uploads-per-client=100\]"),
    ({"disclosure-num-images": 10_001}, r"disclosure-num-images=10001: must be >= 0 and <= 10000"),
])
def test_bounds_between_keys(override, message):
    refused(override, message)


@pytest.mark.parametrize("channels", [
    "8,16,999999",  # too wide
    "8,16," + "9" * 5000,  # more digits than int() takes
    ",".join(["8"] * (MAX_UNET_LEVELS + 1)),  # too deep
    f"8,{MAX_UNET_CHANNELS + 8}",
    "16,\u0663\u0662",  # Arabic-Indic "32": int() would take it
    "1_6,32",
    "16,,32",
    "",
])
def test_unet_block_channels_are_bounded_ascii_widths(channels):
    refused({"unet-block-channels": channels}, rf"unet-block-channels=.*: must be 1 to {MAX_UNET_LEVELS} "
                                               rf"comma-separated multiples of 8 in \[8, {MAX_UNET_CHANNELS}\]")


def test_the_deepest_unet_keeps_the_lowest_level_at_least_one_pixel():
    deepest = ",".join(["8"] * MAX_UNET_LEVELS)
    config = RunConfig.from_flower({"unet-block-channels": deepest, "image-size": 2 ** (MAX_UNET_LEVELS - 1)})
    assert config.image_size // 2 ** (len(config.block_channels) - 1) == 1
    refused({"unet-block-channels": deepest, "image-size": 64}, r"image-size=64: must be divisible by .* = 128")
    assert RunConfig.from_flower({"unet-block-channels": " 16, 32 ,64"}).block_channels == (16, 32, 64)


@pytest.mark.parametrize("channels,block_channels,layers,attention", [
    (1, (8, 16), 1, False), (1, (8,), 1, True), (3, (16, 32, 64), 1, True), (3, (32, 16), 2, True),
    (3, (16, 16, 32), 3, False), (3, (64, 128, 256, 256), 2, True),  # the paper-scale overlays' U-Net
])
def test_the_closed_form_parameter_count_is_diffusers_count(channels, block_channels, layers, attention):
    net = build_denoiser(8, channels, block_channels, layers, attention)
    assert unet_parameters(channels, block_channels, layers, attention) == sum(p.numel() for p in net.parameters())


def test_a_unet_beyond_the_parameter_bound_is_refused_naming_its_keys_and_count():
    """8 levels of 4,096 channels with 8 layers each pass every single-key bound but hold 66.7 G
    parameters: refused before anything is built. The paper-scale U-Net (25.3 M) is taken."""
    widest = ",".join([str(MAX_UNET_CHANNELS)] * MAX_UNET_LEVELS)
    refused({"unet-block-channels": widest, "unet-layers-per-block": 8, "image-size": 128, "dataset": "cifar10"},
            rf"unet-block-channels='{widest}', unet-layers-per-block=8, unet-attention=false: a U-Net of "
            rf"66,744,954,883 parameters; at most {MAX_UNET_PARAMETERS:,}")
    paper = RunConfig.from_flower({"unet-block-channels": "64,128,256,256", "unet-layers-per-block": 2,
                                   "unet-attention": True, "dataset": "cifar10"})
    assert unet_parameters(3, paper.block_channels, 2, True) == 25_304_963
    taken = RunConfig.from_flower({"unet-block-channels": "2048", "unet-layers-per-block": 2})
    channels = taken.image_shape[0]
    assert unet_parameters(channels, (2048,), 2, False) < MAX_UNET_PARAMETERS
    assert unet_parameters(channels, (2048,), 3, False) > MAX_UNET_PARAMETERS
    refused({"unet-block-channels": "2048", "unet-layers-per-block": 3},
            "unet-layers-per-block=3, .* parameters; at most")


@pytest.mark.parametrize("key", sorted(k for k, v in RunConfig().to_flower().items() if isinstance(v, str)))
def test_nul_bytes_are_refused_in_every_string(key):
    refused({key: "a\0b"}, rf"^{key}='a\\x00b': must not contain a NUL byte$")


@pytest.mark.parametrize("value", ["", "  "])
def test_output_dir_must_name_a_directory(value):
    refused({"output-dir": value}, rf"output-dir={value!r}: must name a directory")


@pytest.mark.parametrize("key", ["data-dir", "fid-weights", "fcd-weights", "output-dir"])
def test_an_unknown_users_home_is_refused(key):
    refused({key: "~no-such-user-of-collafuse/x"}, rf"{key}='~no-such-user-of-collafuse/x': its '~' names no user")


@pytest.mark.parametrize("value,message", [
    ("\u00b2:1:raise", r"'\u00b2:1:raise' is not '<client>:<round>:<kind>'"),  # str.isdigit() accepts '²'
    ("\u0661:1:raise", "is not '<client>:<round>:<kind>'"),
    ("1:2:raise,,0:1:nan", "'' is not"),
    ("1:2:raise,", "'' is not"),
    (" ", "'' is not"),
    ("1 :2:raise", "'1 :2:raise' is not"),
    ("1:2:raise:now", "is not"),
    ("1:2:Raise", "is not"),
    ("-1:2:raise", "is not"),
    ("1:2:raise, 1:2:nan", "client 1 in round 2 is listed twice"),
    ("01:2:raise, 1:2:raise", "client 1 in round 2 is listed twice"),
    ("9999999999:1:raise", "is not"),
    ("5:1:raise", r"client 5 or round 1 outside \[0, 5\) x \[1, 4\]"),
])
def test_bad_fault_injection_entries(value, message):
    refused({"num-clients": 5, "fault-injection": value}, rf"fault-injection={re.escape(repr(value))}: .*{message}")


def test_fault_injection_whitespace_rules():
    config = RunConfig.from_flower({"fault-injection": " 1:2:raise ,\t0:1:nan\t"})
    assert config.injected_faults == {(1, 2): "raise", (0, 1): "nan"}
    assert RunConfig.from_flower({"fault-injection": ""}).injected_faults == {}


@pytest.mark.parametrize("value,ok", [("cuda:127", True), ("cuda:0", True), ("cuda:128", False), ("cuda:256", False),
                                      ("cuda:007", False), ("cuda:\u0663", False), ("cuda:", False)])
def test_cuda_indices_torch_can_hold(value, ok):
    if ok:
        assert RunConfig.from_flower({"server-device": value}).server_device == value
    else:
        refused({"client-device": value}, rf"client-device={re.escape(repr(value))}: allowed: .*\[0, 127\]")


def test_output_dir_the_file_system_refuses(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match="output-dir=.*: cannot be created"):
        check_output_dir(str(tmp_path / "a" / "runs"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="output-dir=.*: cannot be created"):
        check_output_dir(str(tmp_path / "file"))
    assert check_output_dir(str(tmp_path / "runs")) == tmp_path / "runs"
