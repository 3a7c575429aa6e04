"""`regmean_gpu.merge` and `eval` against the command line on the repository's test pools:
the same bytes, the same report, the same one-line errors, the same guards."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import regmean_gpu
from conftest import FIXTURES, cli_error, files_of, run_cli

CONFIGS = [
    "gpt2_pool/compat.yaml",
    "gpt2_pool/default.yaml",
    "gpt2_pool/exclude.yaml",
    "clip_pool/compat.yaml",
    "clip_pool/default.yaml",
    "regmeanpp/clip/compat.yaml",
    "regmeanpp/gpt2/default.yaml",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_merge_reproduces_the_cli_bit_for_bit(config, cli, tmp_path):
    cfg = FIXTURES / config
    (tmp_path / "cli").mkdir()
    (tmp_path / "py").mkdir()
    done = run_cli(cli, "merge", "-q", cfg, tmp_path / "cli" / "merged", "--device", "cpu",
                   "--report-json", tmp_path / "cli.json")
    assert done.returncode == 0, done.stderr
    report = regmean_gpu.merge(cfg, tmp_path / "py" / "merged", device="cpu", quiet=True)

    expected = files_of(tmp_path / "cli" / "merged")
    got = files_of(tmp_path / "py" / "merged")
    assert sorted(got) == sorted(expected)
    assert "model.safetensors" in got
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the CLI's"

    # The report is --report-json's, timings aside.
    cli_report = json.loads((tmp_path / "cli.json").read_text())
    untimed = lambda r: {k: v for k, v in r.items() if k not in ("phases_s", "total_s", "peak_rss_bytes")}
    assert untimed(report) == untimed(cli_report)
    assert set(report["phases_s"]) == set(cli_report["phases_s"])
    assert report["models"] and all(m["rows"] > 0 for m in report["models"])
    assert report["fallbacks"] == []


def test_a_dict_config_reads_paths_relative_to_the_current_directory(cli, tmp_path, monkeypatch):
    pool = FIXTURES / "gpt2_pool"
    config = {
        "merge_method": "regmean",
        "base_model": "./base",
        "models": [{"model": f"./{t}", "data": f"./data/{t}.jsonl"} for t in ("task_a", "task_b", "task_c")],
        "parameters": {"num_regmean_examples": 10, "batch_size": 4, "reduce_non_diagonal_ratio": 0.6,
                       "fusionbench_compat": True, "max_length": 24, "shuffle": False},
        "out_dtype": "float32",
    }
    done = run_cli(cli, "merge", "-q", pool / "compat.yaml", tmp_path / "cli", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    monkeypatch.chdir(pool)
    regmean_gpu.merge(config, tmp_path / "py", device="cpu", quiet=True)
    assert files_of(tmp_path / "py") == files_of(tmp_path / "cli")


def test_a_bad_config_raises_the_cli_message(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (FIXTURES / "gpt2_pool" / "compat.yaml").read_text().replace("batch_size:", "batch_sise:")
    # Its paths point back into the pool.
    bad.write_text(text.replace("./", str(FIXTURES / "gpt2_pool") + "/"))
    expected = cli_error(run_cli(cli, "merge", "-q", bad, tmp_path / "cli-out", "--device", "cpu"))
    with pytest.raises(regmean_gpu.RegMeanError) as raised:
        regmean_gpu.merge(bad, tmp_path / "out", device="cpu", quiet=True)
    assert str(raised.value) == expected
    assert "batch_sise" in expected and "\n" not in expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_bad_dict_config_names_the_key(tmp_path):
    with pytest.raises(regmean_gpu.RegMeanError, match="colour") as raised:
        regmean_gpu.merge({"merge_method": "regmean", "base_model": "b", "models": [], "colour": 1},
                          tmp_path / "out", device="cpu", quiet=True)
    assert str(raised.value).startswith("config <dict>: ")
    assert not (tmp_path / "out").exists()


def test_an_output_inside_an_input_is_refused(cli, tmp_path):
    cfg = FIXTURES / "gpt2_pool" / "compat.yaml"
    inside = FIXTURES / "gpt2_pool" / "task_a" / "merged"
    before = sorted(os.listdir(inside.parent))
    expected = cli_error(run_cli(cli, "merge", "-q", cfg, inside, "--device", "cpu"))
    for force in (False, True):
        with pytest.raises(regmean_gpu.RegMeanError) as raised:
            regmean_gpu.merge(cfg, inside, device="cpu", force=force, quiet=True)
        assert str(raised.value) == expected
    assert "inputs are never replaced or changed" in expected
    assert sorted(os.listdir(inside.parent)) == before


def test_an_existing_output_needs_force(tmp_path):
    cfg = FIXTURES / "gpt2_pool" / "compat.yaml"
    out = tmp_path / "merged"
    regmean_gpu.merge(cfg, out, device="cpu", quiet=True)
    first = files_of(out)
    with pytest.raises(regmean_gpu.RegMeanError, match="force"):
        regmean_gpu.merge(cfg, out, device="cpu", quiet=True)
    regmean_gpu.merge(cfg, out, device="cpu", force=True, quiet=True)
    assert files_of(out) == first


def test_a_report_path_inside_an_input_is_refused_before_the_merge(tmp_path):
    cfg = FIXTURES / "gpt2_pool" / "compat.yaml"
    with pytest.raises(regmean_gpu.RegMeanError, match="refusing to write here"):
        regmean_gpu.merge(cfg, tmp_path / "out", device="cpu", quiet=True,
                          report_json=FIXTURES / "gpt2_pool" / "base" / "report.json")
    assert not (tmp_path / "out").exists()


def test_progress_goes_to_stderr_unless_quiet(tmp_path, capfd):
    cfg = FIXTURES / "gpt2_pool" / "compat.yaml"
    regmean_gpu.merge(cfg, tmp_path / "loud", device="cpu")
    loud = capfd.readouterr()
    assert "[1/3] task_a" in loud.err and "forward + Grams" in loud.err
    assert "merged 3 GPT-2 models (RegMean) into" in loud.out
    regmean_gpu.merge(cfg, tmp_path / "quiet", device="cpu", quiet=True)
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""


def test_ctrl_c_raises_keyboard_interrupt_and_leaves_no_output(cli, tmp_path, monkeypatch):
    # A pool whose merge takes seconds: two 2-layer ViT-B/32 towers over 64 images each, each
    # model held open a second before its weights are read (the engine's test hook), so that
    # the interrupt lands mid-merge however fast the machine is.
    monkeypatch.setenv("REGMEAN_TEST_MODEL_DELAY_MS", "1000")
    pool = tmp_path / "pool"
    done = run_cli(cli, "synth", "-q", "--arch", "clip", "--layers", "2", "--models", "2",
                   "--examples", "64", "--out", pool)
    assert done.returncode == 0, done.stderr
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            regmean_gpu.merge(pool / "merge.yaml", out_parent / "merged", device="cpu", quiet=True)
    finally:
        timer.cancel()
    # It stopped at the next batch, not at the end of the merge.
    assert time.monotonic() - started < 6
    assert list(out_parent.iterdir()) == [], "the partial output was left behind"


def test_eval_returns_what_the_cli_prints_as_json(cli):
    pool = FIXTURES / "eval" / "gpt2"
    done = run_cli(cli, "eval", "-q", "base", "--config", "merge_ids.yaml", "--json", "--device", "cpu", cwd=pool)
    assert done.returncode == 0, done.stderr
    got = regmean_gpu.eval(pool / "base", config=pool / "merge_ids.yaml", device="cpu", quiet=True)
    assert got == json.loads(done.stdout)
    assert set(got["tasks"]) == {"task_a", "task_b"}


def test_eval_errors_raise_the_cli_message(cli, tmp_path):
    pool = FIXTURES / "eval" / "gpt2"
    missing = tmp_path / "missing.jsonl"
    expected = cli_error(run_cli(cli, "eval", "-q", pool / "base", "--data", missing, "--head",
                                 pool / "task_a", "--device", "cpu"))
    with pytest.raises(regmean_gpu.RegMeanError) as raised:
        regmean_gpu.eval(pool / "base", data=missing, head=pool / "task_a", device="cpu", quiet=True)
    assert str(raised.value) == expected
