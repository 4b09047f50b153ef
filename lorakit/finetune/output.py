"""The run folder: what a lorakit run writes there, and the rules that keep everything else safe.

A run owns exactly these paths in its folder: ``run.json`` (its settings, written before training),
``checkpoint/checkpoint.pt`` (while it trains), ``adapter/`` (peft's files) and ``metrics.json`` (when it
is done). lorakit deletes nothing else, ever: a folder that holds any other file is refused, with or
without ``overwrite``, because it is not a lorakit run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit._io import atomic_write_json

RUN_FILE = "run.json"  # the settings of the run in an output folder, written before training
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
# Every file a run may leave; atomic writes' temporary files (".name.XXXX.tmp") are the run's too.
RUN_FILES = (
    RUN_FILE,
    METRICS_FILE,
    f"{CHECKPOINT_DIR}/checkpoint.pt",
    f"{ADAPTER_DIR}/adapter_config.json",
    f"{ADAPTER_DIR}/adapter_model.safetensors",
    f"{ADAPTER_DIR}/README.md",  # peft's save_pretrained (backend="hf") writes a model card
)
RUN_FOLDERS = (CHECKPOINT_DIR, ADAPTER_DIR)


class RunComplete(FileExistsError):
    """The output folder holds this very run, finished: nothing to do. ``metrics`` are its results."""

    def __init__(self, folder: Path, metrics: dict):
        self.folder, self.metrics = folder, metrics
        super().__init__(
            f"the run in {str(folder)!r} is already complete, with these settings: "
            f"{summary(metrics)}. Its adapter and metrics.json are there; choose another --out "
            "to train again, or pass --overwrite (overwrite=True) to replace it"
        )


def summary(metrics: dict) -> str:
    """One line of a run's results, from its metrics."""
    if metrics.get("diverged"):
        return f"diverged at step {metrics['diverged']['step']}: {metrics['diverged']['reason']}"
    before, after = metrics.get("ppl_before"), metrics.get("ppl_after")
    text = f"{metrics.get('steps')} steps"
    loss_before, loss_after = metrics.get("heldout_loss_before"), metrics.get("heldout_loss_after")
    if loss_before is not None and loss_after is not None:
        text += f", held-out loss per answer token {loss_before:.3f} -> {loss_after:.3f}"
    if before is not None and after is not None:
        text += f", held-out perplexity {before:.2f} -> {after:.2f} ({100 * (after / before - 1):+.1f}%)"
    return text


def _is_run_file(relative: str) -> bool:
    folder, _, name = relative.rpartition("/")
    temporary = name.startswith(".") and name.endswith(".tmp")
    return relative in RUN_FILES or (temporary and (folder == "" or folder in RUN_FOLDERS))


def foreign_files(folder: Path) -> list[str]:
    """Paths in ``folder`` that are not a lorakit run's own files (sorted, relative, folders end in '/')."""
    foreign = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            if relative not in RUN_FOLDERS:
                foreign.append(relative + "/")
        elif not _is_run_file(relative):
            foreign.append(relative)
    # a foreign folder's content is foreign too: name the folder only
    return [p for p in foreign if not any(p != q and p.startswith(q) for q in foreign if q.endswith("/"))]


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def remove_run(folder: Path) -> None:
    """Delete a run's own files in ``folder`` (and its empty run folders); nothing else."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and _is_run_file(relative):
            path.unlink()
        elif path.is_dir() and relative in RUN_FOLDERS and not any(path.iterdir()):
            path.rmdir()


def remove_checkpoint(folder: Path) -> None:
    """Delete the run's checkpoint file, and its folder when nothing else is in it."""
    checkpoint = folder / CHECKPOINT_DIR
    (checkpoint / "checkpoint.pt").unlink(missing_ok=True)
    if checkpoint.is_dir() and not any(checkpoint.iterdir()):
        checkpoint.rmdir()


def differences(old: dict, new: dict) -> str:
    """``"steps 3 -> 4, lr 0.0002 -> 0.001"``: the settings that differ."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys if old.get(k) != new.get(k)
    )


def prepare_output(out: str | os.PathLike, settings: dict, overwrite: bool = False) -> Path:
    """Make ``out`` ready for the run with ``settings`` without losing anybody's files.

    * a missing or empty folder: the run starts there;
    * the same run (same ``run.json``) unfinished: kept, so training resumes from its checkpoint;
    * the same run finished (``metrics.json`` present): :class:`RunComplete`, unless ``overwrite``;
    * another lorakit run: refused unless ``overwrite``, which deletes that run's files only. A run
      that wrote nothing but its run.json (a start refused later) has nothing to lose and is replaced;
    * anything else (a file lorakit did not write, or a folder without run.json): refused, even with
      ``overwrite``.
    """
    folder = Path(out).expanduser()
    if folder.is_dir() and any(folder.iterdir()):
        previous = read_json(folder / RUN_FILE)
        # without its run.json nothing in the folder is known to be lorakit's: all of it is someone else's
        foreign = foreign_files(folder) if previous is not None else sorted(p.name for p in folder.iterdir())
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(
                f"output folder {str(out)!r} holds files that are not a lorakit run's ({shown}); lorakit "
                "never deletes them, with or without --overwrite. Choose a new or empty folder for --out"
            )
        metrics = read_json(folder / METRICS_FILE)
        results = [p for p in folder.rglob("*") if p.is_file() and p.name != RUN_FILE and not p.name.endswith(".tmp")]
        if previous == settings and metrics is not None and not overwrite:
            raise RunComplete(folder, metrics)
        if previous != settings and results and not overwrite:
            raise FileExistsError(
                f"output folder {str(out)!r} holds a different run "
                f"({differences(previous, settings)}); choose another --out, or pass "
                "--overwrite (overwrite=True) to replace that run"
            )
        if previous != settings or metrics is not None:
            remove_run(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RUN_FILE, {k: settings[k] for k in sorted(settings)})
    return folder
