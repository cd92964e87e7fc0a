"""bench.gpu_check's parts that need no GPU: how it compares token lists and reads pytest's JUnit file, and its
refusal without a CUDA device. (scripts/gpu_check.sh runs the whole of it on a GPU.)"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from bench.gpu_check import compare, junit_summary, merge


def test_compare_counts_whole_agreements_and_where_the_others_diverge() -> None:
    got = [[1, 2, 3], [1, 2, 4], [9, 2, 3], [1, 2]]  # the last one ended (EOS) where the other went on
    want = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]]
    assert compare(got, want) == {"prompts": 4, "equal": 1, "first_divergence": [2, 0, 2]}


def test_junit_summary_lists_failures_and_skips(tmp_path: pathlib.Path) -> None:
    test = tmp_path / "test_probe.py"
    test.write_text("import pytest\n"
                    "def test_ok(): pass\n"
                    "def test_bad(): assert False\n"
                    "@pytest.mark.skip(reason='x')\n"
                    "def test_skipped(): pass\n")
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), "--junitxml", str(xml)],
                   cwd=tmp_path, capture_output=True, timeout=120)
    summary = junit_summary(str(xml))
    assert summary["tests"] == 3
    assert [name.split("::")[-1] for name in summary["failed"]] == ["test_bad"]
    assert [name.split("::")[-1] for name in summary["skipped"]] == ["test_skipped"]


def test_merge_keeps_what_each_step_left(tmp_path: pathlib.Path) -> None:
    (tmp_path / "figures.json").write_text('{"fp32_vs_transformers": {"equal": 16}}')
    report = merge(tmp_path, {"gpu_tests": 124, "bench": 0}, 400.0)
    assert report["exit_codes"] == {"gpu_tests": 124, "bench": 0} and report["seconds"] == 400.0
    assert report["fp32_vs_transformers"] == {"equal": 16}
    assert report["gpu_tests"] is None and report["triton_tests"] is None  # killed before their JUnit files


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_says_so(tmp_path: pathlib.Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--json", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs a CUDA device" in done.stderr
