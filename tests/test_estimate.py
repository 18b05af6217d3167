"""The storage model is pure: checked against the paper's figures and DESIGN.md's arithmetic."""
import json

import pytest

from jobs.cli import main as cli
from storage.estimate import (GB, MEASURED_ZSTD_RATIO, GiB, TB, TiB, Assumptions, bare_codes, default_zstd_ratio, estimate,
                              monthly_cost, paper_figures)


def test_paper_figures_only_fit_one_byte_per_value_in_binary_units():
    figs = {c.label: c.bytes for c in paper_figures(32_000_000, 150)}
    assert round(figs["768 dims x 1 B"] / TiB, 2) == 3.35
    assert round(figs["192 dims x 1 B (int8)"] / GiB, 1) == 858.3
    assert round(figs["768 dims x 2 B (fp16)"] / TB, 2) == 7.37
    assert round(figs["192 dims x 2 B (fp16)"] / TB, 2) == 1.84


def test_estimate_components_add_up_and_state_their_assumptions():
    a = Assumptions(passages=1000, tokens_per_passage=100, dims=192, bits=8, zstd_ratio=1.0,
                    scale_bytes=2, scale_zstd_ratio=1, token_id_bytes=2, per_passage_bytes=40, container_per_passage=0,
                    dpr_dim=0)
    e = estimate(a)
    assert e.components["codes"] == 1000 * 100 * 192 == bare_codes(1000, 100, 192, 1)
    assert e.per_token() == pytest.approx(192 + 2 + 2 + 0.4)
    fp16 = estimate(Assumptions(passages=1000, tokens_per_passage=100, bits=16, dpr_dim=0, container_per_passage=0))
    assert fp16.components["codes"] == 1000 * 100 * 192 * 2 and fp16.components["scales"] == 0
    packed5 = estimate(Assumptions(passages=10, tokens_per_passage=10, bits=5, bitpacked=True, dpr_dim=0))
    assert packed5.components["codes"] == pytest.approx(10 * 10 * 192 * 5 / 8)
    zstd = estimate(Assumptions(passages=10, tokens_per_passage=10, zstd_ratio=1.6, dpr_dim=0))
    assert zstd.components["codes"] == pytest.approx(10 * 10 * 192 / 1.6)
    assert monthly_cost(100 * GB, 0.023) == pytest.approx(2.3)


def test_the_default_zstd_ratio_never_flatters():
    """Unmeasured widths take the ratio of the nearest measured width with more bits (less compressible)."""
    assert default_zstd_ratio(8) == MEASURED_ZSTD_RATIO[8] > 1
    assert default_zstd_ratio(6) == MEASURED_ZSTD_RATIO[8] < default_zstd_ratio(5.25) == default_zstd_ratio(4)
    assert default_zstd_ratio(16) == MEASURED_ZSTD_RATIO[16]
    assert default_zstd_ratio(8, bitpacked=True) == default_zstd_ratio(8, compressible=False) == 1.0


def test_estimate_cli_defaults_price_the_measured_paper_geometry(capsys):
    assert cli(["estimate", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["assumptions"]["zstd_ratio"] == MEASURED_ZSTD_RATIO[8]
    assert cli(["estimate", "--json", "--codec", "pq", "--pq-m", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["assumptions"]["zstd_ratio"] == 1.0  # PQ indices do not shrink


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=12), dict(zstd_ratio=0), dict(passages=-1), dict(dims=0)])
def test_bad_assumptions_are_refused(bad):
    with pytest.raises(ValueError):
        Assumptions(**bad)


def test_estimate_cli_text_and_json(capsys):
    assert cli(["estimate", "--passages", "32000000", "--tokens-per-passage", "150", "--hidden", "768",
                "--dims", "192", "--bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "858.3 GiB" in out and "3.35 TiB" in out and "2x larger" in out and "s3-standard" in out
    assert cli(["estimate", "--dims", "768", "--bits", "16", "--dpr-dim", "0", "--zstd-ratio", "1", "--json",
                "--price", "mine=0.01"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert round(body["components_bytes"]["codes"] / TB, 2) == 7.37
    assert "mine" in body["monthly_cost_usd"]
    assert cli(["estimate", "--bits", "12"]) == 2
    assert cli(["estimate", "--price", "oops"]) == 2
