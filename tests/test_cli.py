"""The command lines as a learner runs them, each in its own process: lorakit's errors are one line on
stderr with exit code 2 (``--debug`` shows the traceback), refused before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, preexec_fn=None, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=environment, cwd=ROOT, preexec_fn=preexec_fn
    )


def one_line_error(done: subprocess.CompletedProcess, prog: str, text: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and text in lines[0], done.stderr


@pytest.mark.parametrize(
    "args, text",
    [
        (["--device", "tpu"], "device='tpu' is not a device torch knows; available here: cpu"),
        (["--train-blocks", "-5"], "train_blocks=-5 is not valid"),
        (["--seq-len", "100000"], "seq_len=100000 is not valid for smollm2-135m-instruct: it has 8192 positions"),
    ],
)
def test_finetune_refuses_bad_input_in_one_line_before_writing(tmp_path, args, text):
    done = run("lorakit.finetune", *args, "--out", str(tmp_path / "run"))
    one_line_error(done, "python -m lorakit.finetune", text)
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    done = run("lorakit.finetune", "--device", "tpu", "--debug", "--out", str(tmp_path / "run"))
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError: device='tpu'" in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["lorakit.finetune", "--out", "{tmp}/run"],
        ["lorakit.lab", "--steps", "1", "--no-progress"],
    ],
)
def test_a_missing_asset_is_one_line_that_says_how_to_fetch_it(tmp_path, command):
    done = run(*[c.format(tmp=tmp_path) for c in command], LORAKIT_CACHE=str(tmp_path / "empty"))
    one_line_error(done, f"python -m {command[0]}", "Fetch it with: python -m lorakit.assets fetch")
    assert not (tmp_path / "run").exists()


def test_a_run_that_will_not_fit_is_refused_with_the_breakdown(tmp_path):
    done = run("lorakit.finetune", "--out", str(tmp_path / "run"), LORAKIT_FREE_MEMORY=str(10**8))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "only 0.10 GB are free ($LORAKIT_FREE_MEMORY)" in done.stderr
    assert "a setting that fits" in done.stderr or "no smaller setting tried fits" in done.stderr
    assert "activations" in done.stderr and "total" in done.stderr  # the breakdown, line by line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_an_address_space_limit_counts_as_the_memory_available(tmp_path):
    """newcomer.md B1: under a 12 GB address-space cap (prlimit --as), a long sequence ran out of memory after
    minutes. SmolLM2's longest allowed sequence is now refused at once, with the cap named and a fix."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (12 * 10**9, resource.RLIM_INFINITY))

    done = run(
        "lorakit.finetune",
        "--seq-len",
        "8192",
        "--batch-size",
        "1",
        "--eval-blocks",
        "1",
        "--out",
        str(tmp_path / "run"),
        preexec_fn=cap,
        LORAKIT_DTYPE="float32",
    )  # the newcomer's run computed in float32 (bf16 halves the activations)
    assert done.returncode == 2 and "the address-space limit (ulimit -v)" in done.stderr, done.stderr
    assert "a setting that fits: --gradient-checkpointing" in done.stderr
    assert not (tmp_path / "run").exists()


def test_python_m_lorakit_names_itself():
    done = run("lorakit", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: python -m lorakit ")
    assert "python -m lorakit.finetune" in done.stdout  # and lists the other command lines


def test_finetune_data_refuses_a_malformed_line_naming_it(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "Hi?", "completion": "Hello"}\n{"prompt": "Hi?", "completion": "Hello"\n')
    done = run("lorakit.finetune", "--data", str(data), "--out", str(tmp_path / "run"))
    one_line_error(done, "python -m lorakit.finetune", "mine.jsonl:2: invalid JSON")
    assert not (tmp_path / "run").exists()


def test_finetune_data_end_to_end_on_a_tiny_model(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_finetune import chat_file, tiny_chat_model_folder

    folder = tiny_chat_model_folder(tmp_path / "model")
    data = chat_file(tmp_path / "mine.jsonl")
    out = tmp_path / "run"
    args = ["--method", "qlora", "--model", str(folder), "--data", str(data), "--out", str(out)]
    done = run("lorakit.finetune", *args, "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "11 training and 1 held-out examples; 0 over 64 tokens dropped" in done.stdout
    assert "held-out loss per answer token" in done.stdout and "exact-match accuracy" in done.stdout
    assert (out / "metrics.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
