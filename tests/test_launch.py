"""collafuse-run merges TOML overlays and key=value strings into what flwr run accepts."""

from __future__ import annotations

from flwr.common.config import parse_config_args

from collafuse_flwr.tools.launch import merge_run_configs


def test_overlay_and_strings_merge_later_wins(tmp_path):
    overlay = tmp_path / "x.toml"
    overlay.write_text('dataset = "celeba"\nt-zeta = 200\nunet-attention = true\nclient-lr = 0.0002\n')
    merged = merge_run_configs([str(overlay), "t-zeta=100 data-dir='/data/my faces' attribute-groups='a,b; c'"])
    assert parse_config_args([merged]) == {
        "dataset": "celeba", "t-zeta": 100, "unet-attention": True, "client-lr": 0.0002,
        "data-dir": "/data/my faces", "attribute-groups": "a,b; c",
    }


def test_a_string_with_a_single_quote_survives():
    assert parse_config_args([merge_run_configs(["data-dir=\"/data/o'brien\""])]) == {"data-dir": "/data/o'brien"}
