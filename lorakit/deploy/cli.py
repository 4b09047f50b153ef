"""``python -m lorakit.deploy --adapter DIR --to TARGET --out DIR``: one saved adapter, deployed and verified.

Everything that can be checked is checked before any work: the target, the output folder (it must be new
or empty, or ``--overwrite``), the adapter folder (present, readable, plain LoRA) and its fit to the base
(the modules it targets exist, its tensors have their shapes), and, for an ONNX target, the ``deploy``
extra. The export is written into a temporary folder beside ``--out``, loaded back and compared with the
merged model, and only then renamed into place: an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from lorakit._io import atomic_write_json
from lorakit.deploy._files import atomic_folder, check_output_folder, folder_bytes
from lorakit.deploy.merged import BaseSpec, DeployError, base_of, check_adapter

PROG = "python -m lorakit.deploy"
TARGETS = ("merged", "onnx-int4", "onnx-fp32", "gguf-q8_0", "gguf-q4_1")
CHECK_TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
MANIFEST = "deploy.json"


def _check_target(to: str) -> None:
    if to not in TARGETS:
        raise DeployError(f"--to {to!r} is not a deployment target; choose one of {', '.join(TARGETS)}")
    if to.startswith("onnx"):
        try:
            import onnxruntime  # noqa: F401
            import onnxruntime_genai  # noqa: F401
        except ImportError as e:
            raise DeployError(
                f"--to {to} needs ONNX Runtime GenAI ({e}); "
                "install lorakit's deploy extra: pip install 'lorakit[deploy]'"
            ) from e


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    from lorakit import _quiet

    with _quiet.loading():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def _check_same_weights(model, loaded) -> None:
    """The saved checkpoint holds the merged weights exactly (float32 holds every bfloat16 value)."""
    saved = loaded.state_dict()
    for key, value in model.state_dict().items():
        if key in saved and not torch.equal(saved[key], value.float()):
            error = (saved[key] - value.float()).abs().max().item()
            raise DeployError(f"the saved {key} differs from the merged weight by {error:.3g}; nothing was written")


@torch.no_grad()
def _verify(to: str, out: Path, model, tokenizer) -> dict:
    """Load the written output back and compare its logits with the merged model's on ``CHECK_TEXT``."""
    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"][:, : model.config.max_position_embeddings]
    reference = model(input_ids=ids).logits.float()
    if to == "merged":
        logits = _load(out)(input_ids=ids).logits
        expected, tolerance = reference, 0.0  # the same float32 weights
    elif to.startswith("onnx"):
        from lorakit.deploy.onnx import OnnxLM

        logits = OnnxLM(out)(input_ids=ids).logits
        expected = reference
        tolerance = 1e-3 if to == "onnx-fp32" else None  # INT4: its quantization error, measured and reported
    else:
        from lorakit.deploy.gguf import gguf_roundtrip, read_gguf

        logits = read_gguf(next(out.glob("*.gguf")))(input_ids=ids).logits
        expected, tolerance = gguf_roundtrip(model, to.removeprefix("gguf-"))(input_ids=ids).logits, 1e-3
    error = (logits.float() - expected).abs().max().item()
    report = {
        "tokens": ids.shape[1],
        "max_logit_error_vs_merged": (logits.float() - reference).abs().max().item(),
        "mean_logit_error_vs_merged": (logits.float() - reference).abs().mean().item(),
        "top1_agreement_with_merged": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }
    if to.startswith("gguf"):
        report["max_logit_error_vs_same_quantization_in_memory"] = error
    if not torch.isfinite(logits).all():
        raise DeployError(f"the {to} output gives non-finite logits when loaded back; nothing was written")
    if tolerance is not None and error > tolerance:
        raise DeployError(
            f"the {to} output, loaded back, differs from what it should hold by {error:.3g} in its logits "
            f"(allowed {tolerance:g}); nothing was written"
        )
    return report


def deploy(
    adapter: str | Path,
    to: str,
    out: str | Path,
    overwrite: bool = False,
    base: str | None = None,
    log=print,
) -> dict:
    """Deploy the adapter folder ``adapter`` as ``to`` (one of :data:`TARGETS`) into the folder ``out``;
    returns the manifest written to ``out/deploy.json`` (provenance, size, verification figures)."""
    _check_target(to)
    out = check_output_folder(out, overwrite)
    spec = base_of(adapter)
    if base is not None:
        spec = dataclasses.replace(spec, model=base)
    check_adapter(adapter, spec.model)

    from lorakit.deploy.merged import merge_adapter, save_merged

    with atomic_folder(out, overwrite) as tmp:
        log(f"merging {adapter} into {spec.model} ({spec.quant_type or 'float'} base, as trained) ...")
        model, tokenizer = merge_adapter(adapter, spec)
        with tempfile.TemporaryDirectory() as hf:
            # The float32 merged checkpoint is every route's source: the exporters read it, and the checks
            # compare with it loaded back (a fresh float32 model, as the exporters and readers build one).
            source = tmp if to == "merged" else Path(hf)
            save_merged(model, tokenizer, source)
            merged = _load(source)
            if to == "merged":
                _check_same_weights(model, merged)
            elif to.startswith("onnx"):
                from lorakit.deploy.onnx import export_onnx

                log(f"exporting to ONNX Runtime GenAI ({to.removeprefix('onnx-').upper()}, CPU) ...")
                export_onnx(source, tmp, to.removeprefix("onnx-"))
            else:
                from lorakit.deploy.gguf import write_gguf

                qtype = to.removeprefix("gguf-")
                log(f"writing GGUF ({qtype.upper()}) ...")
                write_gguf(merged, tokenizer, tmp / f"model.{qtype}.gguf", qtype)
            log("loading it back to verify ...")
            verification = _verify(to, tmp, merged, tokenizer)
        manifest = {
            "target": to,
            "adapter": str(Path(adapter).resolve()),
            "base": dataclasses.asdict(spec),
            "bytes": folder_bytes(tmp),
            "verification": verification,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    log(
        f"wrote {out} ({manifest['bytes'] / 1e6:.1f} MB); loaded back: mean |logit error| vs the merged model "
        f"{verification['mean_logit_error_vs_merged']:.3g}, "
        f"top-1 agreement {verification['top1_agreement_with_merged']:.0%}"
    )
    return manifest


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Deploy a saved LoRA/QLoRA adapter: merged checkpoint, ONNX Runtime GenAI (INT4, FP32) or GGUF.",
    )
    p.add_argument(
        "--adapter", required=True, help="the adapter folder (adapter_config.json and adapter_model.safetensors)"
    )
    p.add_argument("--to", required=True, help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--out", required=True, help="the output folder (new or empty; written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that holds files")
    p.add_argument(
        "--base",
        default=None,
        help=f"the base model (default: the run's, from run.json beside the adapter, else {BaseSpec().model})",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    deploy(a.adapter, a.to, a.out, overwrite=a.overwrite, base=a.base, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"out": a.out, "target": a.to}))
    return 0
