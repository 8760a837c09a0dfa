"""The benchmarks run end to end at a tiny scale on the CPU and print what they promise."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import REPO, run


@pytest.mark.slow
def test_bench_augment_training_prints_rates_and_their_ratios() -> None:
    proc = run([sys.executable, "benchmarks/bench_augment_training.py", "--backbone", "small_cnn", "--size", "16",
                "--stored", "20", "--images", "128", "--batch", "32", "--epochs", "1", "--workers", "1",
                "--device", "cpu"], REPO, timeout=90)
    out = proc.stdout
    assert re.search(r"^device: cpu$", out, re.M), out
    assert re.search(r"^torch \S+$", out, re.M), out
    rates = {label: float(rate) for label, rate in re.findall(r"^(ours.*?|DataLoader.*?)\s+([\d.]+) img/s$", out, re.M)}
    assert len(rates) == 4 and all(r > 0 for r in rates.values()), out
    none, standard, stream = (rates[k] for k in ("ours, augment=none", "ours, augment=standard + mixup/cutmix",
                                                  "ours, augment=standard + mixup/cutmix, streamed"))
    loader = rates["DataLoader, v2 transforms + mixup/cutmix"]
    ratios = {label: float(r) for label, r in re.findall(r"^(.+): ([\d.]+)x$", out, re.M)}
    expected = {"augmented / not augmented (ours)": standard / none,
                "ours / DataLoader (both augmented)": standard / loader,
                "streamed / resident (augmented)": stream / standard}
    assert ratios.keys() == expected.keys(), out
    for label, value in expected.items():
        assert ratios[label] == pytest.approx(value, abs=0.011), (label, out)


@pytest.mark.slow
def test_bench_ddp_prints_the_rate_of_each_process_count_against_one_plain_process() -> None:
    proc = run([sys.executable, "benchmarks/bench_ddp.py", "--backbone", "small_cnn", "--size", "8", "--images",
                "512", "--batch", "64", "--epochs", "1", "--device", "cpu", "--procs", "2"], REPO, timeout=180)
    out = proc.stdout
    rows = re.findall(r"^(one process|torchrun, \d process(?:es)?)\s+(\d+) img/s\s+([\d.]+)x$", out, re.M)
    assert [label for label, _, _ in rows] == ["one process", "torchrun, 2 processes"], out
    plain = float(rows[0][1])
    for _, rate, ratio in rows:
        assert float(rate) > 0 and float(ratio) == pytest.approx(float(rate) / plain, abs=0.011), out
