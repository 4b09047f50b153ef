"""The ONNX Runtime GenAI routes: the merged model exported to INT4 (MatMulNBits) or FP32 for the CPU with
ONNX Runtime GenAI's model builder, and generation with its runtime (KV cache, the same sampling settings).

``export_onnx`` runs the builder (``onnxruntime_genai.models.builder``, the documented
``python -m onnxruntime_genai.models.builder -i DIR -o OUT -p int4 -e cpu`` as a function call) on a
transformers checkpoint folder. INT4 is round-to-nearest, symmetric 4-bit codes in blocks of 32 with one
float scale per block (the ``MatMulNBits`` operator) for every linear layer of the blocks. ``int8`` chooses
what stays in 8 bits (:data:`ONNX_INT8`): the builder's default (``"none"``) quantizes the output head to 4
bits too, shared with the token embedding (SmolLM2 ties them); lorakit's default (``"head"``) keeps the
head in 8 bits (the embedding stays 4-bit, no longer shared: about 30 MB more for SmolLM2-135M);
``"mixed"`` also keeps the layers that llama.cpp's mixed quantization keeps in more bits (the builder's
``mixed_layers``: the first and last eighth of the blocks and some projections of every third block).
:class:`OnnxLM` generates with ``onnxruntime_genai`` and, for perplexity and logit comparisons, runs the same
``model.onnx`` with plain ``onnxruntime`` on whole blocks of tokens.

Unmerged adapters over one base (:func:`export_onnx_adapters`) live in :mod:`lorakit.deploy.serve`'s
sibling functions here: the base is exported once with LoRA paths whose weights are model inputs, and
each peft-format adapter becomes an ``.onnx_adapter`` file that ``og.Adapters`` loads and a request
activates (``generator.set_active_adapter``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ONNX_PRECISIONS = ("int4", "fp32")
# What an INT4 export keeps in 8 bits: the builder's options for each choice (``matmul_mixed_precision``
# selects MatMul groups; ONNX Runtime's quantized Gather is 4-bit only, so an 8-bit head cannot be shared
# with the embedding, which is then quantized to 4 bits on its own).
ONNX_INT8 = {
    "none": [],
    "head": [
        "matmul_mixed_precision=last_matmul:int8",
        "shared_embeddings=false",
        "op_types_to_quantize=MatMul/Gather",
    ],
    "mixed": [
        "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",
        "shared_embeddings=false",
        "op_types_to_quantize=MatMul/Gather",
    ],
}
ADAPTER_SUFFIX = ".onnx_adapter"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# The builder's names for a LoRA layer's two MatMul weights (A^T: (d_in, r) and (alpha / r) B^T: (r, d_out)).
LORA_PARAM = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.MatMul\.weight$")


def _not_the_gather_notice(record: logging.LogRecord) -> bool:
    """With an 8-bit head the quantizer's 8-bit pass visits the embedding's Gather, logs this at ERROR and leaves
    it to the 4-bit pass, which quantizes it (checked in tests/test_deploy.py): not an error of the export."""
    return record.getMessage() != "Gather only supports 4 bits quantization."


@contextlib.contextmanager
def quiet_builder():
    """Keep the builder's progress lines (stdout, tqdm on stderr, the quantizer's INFO log) out of the output;
    on an error they are attached to the exception's notes."""
    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("onnxruntime", "onnxruntime.quantization", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    quantizer = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    quantizer.addFilter(_not_the_gather_notice)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    except Exception as e:
        e.add_note("the model builder's output ended with:\n" + out.getvalue()[-2000:])
        raise
    finally:
        quantizer.removeFilter(_not_the_gather_notice)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_module_name(module: str) -> str:
    """The builder's name for a transformers Llama module: ``model.layers.0.self_attn.q_proj`` ->
    ``model.layers.0.attn.q_proj`` (the MLP keeps its name)."""
    return module.replace(".self_attn.", ".attn.")


def _lora_nodes(model_dir: str | os.PathLike) -> list[str]:
    """The builder's node names of every possible LoRA MatMul, kept in float by the INT4 quantizer."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    nodes = []
    for i in range(config["num_hidden_layers"]):
        for group, projs in (("attn", ATTN_PROJ), ("mlp", MLP_PROJ)):
            for proj in projs:
                nodes += [f"/model/layers.{i}/{group}/{proj}/{part}/MatMul" for part in ("lora_A", "lora_B")]
    return nodes


def export_onnx(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    precision: str = "int4",
    adapter: str | os.PathLike | None = None,
    block_size: int = 32,
    accuracy_level: int | None = None,
    int8: str = "head",
) -> Path:
    """Export the transformers checkpoint in ``model_dir`` (config, weights, tokenizer) to ONNX Runtime
    GenAI's format in the folder ``out``: ``model.onnx``, ``model.onnx.data``, ``genai_config.json`` and
    the tokenizer files. ``precision`` is ``"int4"`` (MatMulNBits, blocks of ``block_size``) or ``"fp32"``.

    ``adapter`` (a peft-format folder) adds its LoRA paths unmerged (``x W + x A^T (alpha / r) B^T``),
    kept in float32 under INT4 so that :func:`export_onnx_adapters` can turn them into inputs.
    ``accuracy_level`` is MatMulNBits' (the builder's default on the CPU is 4: activations quantized to int8
    per block; 1 keeps them in float32). ``int8`` (INT4 only) is what stays in 8 bits: ``"head"`` (the
    default: the output head), ``"mixed"`` (the head and llama.cpp's sensitive layers) or ``"none"`` (the
    builder's default: everything 4-bit, the head shared with the embedding); see :data:`ONNX_INT8`.
    """
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {ONNX_PRECISIONS}")
    if int8 not in ONNX_INT8:
        raise ValueError(f"int8={int8!r} is not one of {sorted(ONNX_INT8)}")
    out = Path(out)
    extra = ["hf_token=false"]
    if precision == "int4":
        extra.append(f"block_size={block_size}")
        if accuracy_level is not None:
            extra.append(f"accuracy_level={accuracy_level}")
        extra += ONNX_INT8[int8]
    if adapter is not None:
        extra.append(f"adapter_path={adapter}")
        if precision == "int4":
            extra.append("nodes_to_exclude=" + ",".join(_lora_nodes(model_dir)))
    with tempfile.TemporaryDirectory() as cache, quiet_builder():
        options = parse_extra_options(None, str(model_dir), str(out), precision, "cpu", cache, extra)
        create_model(None, str(model_dir), str(out), precision, "cpu", cache, **options)
    return out


class OnnxLM:
    """An exported model: ``generate_ids`` with ONNX Runtime GenAI, and ``model(input_ids=...)`` logits
    with ONNX Runtime (for :func:`lorakit.compare_logits`), both on ``threads`` CPU threads.

    ``adapters`` maps names to ``.onnx_adapter`` files (from :func:`export_onnx_adapters`); a request
    names the one it runs with.
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, adapters: Mapping[str, os.PathLike] = ()):
        import onnxruntime as ort
        import onnxruntime_genai as og

        ort.set_default_logger_severity(3)  # errors only
        self.folder = Path(folder)
        self.threads = threads or torch.get_num_threads()
        config = og.Config(str(self.folder))
        config.clear_providers()  # the CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}))
        self.model = og.Model(config)
        self.genai_config = json.loads((self.folder / "genai_config.json").read_text())
        self.adapter_files = {name: Path(path) for name, path in dict(adapters).items()}
        self.adapters = None
        if self.adapter_files:
            self.adapters = og.Adapters(self.model)
            for name, path in self.adapter_files.items():
                self.adapters.load(str(path), name)
        self._session = None
        self._ort_adapters: dict = {}

    def __repr__(self) -> str:
        return f"OnnxLM({self.folder.name!r}, threads={self.threads}, adapters={sorted(self.adapter_files)})"

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapter_files:
            loaded = sorted(self.adapter_files) or "none"
            raise ValueError(f"adapter {adapter!r} is not loaded; this model has {loaded}")

    def generate_ids(
        self,
        ids: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        min_new_tokens: int = 0,
        adapter: str | None = None,
    ) -> list[int]:
        """The new token ids after ``ids``: greedy (``temperature=0``) or sampled with nucleus ``top_p``
        and no top-k cut, as :func:`lorakit.generate`; stops at EOS unless ``min_new_tokens`` forbids it."""
        import onnxruntime_genai as og

        self._check_adapter(adapter)
        params = og.GeneratorParams(self.model)
        search = dict(
            max_length=len(ids) + max_new_tokens,
            min_length=len(ids) + min_new_tokens,
            repetition_penalty=repetition_penalty,
            do_sample=temperature > 0,
        )
        if temperature > 0:
            vocab = self.genai_config["model"]["vocab_size"]
            search.update(temperature=temperature, top_p=top_p, top_k=vocab, random_seed=seed)
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        new = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return new

    # ----------------------------------------------------------------- logits with plain ONNX Runtime
    def _ort(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3  # errors only
            self._session = ort.InferenceSession(
                str(self.folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def __call__(self, input_ids: torch.Tensor, adapter: str | None = None, **_) -> SimpleNamespace:
        """Logits ``(B, T, vocab)`` (float32, on the ids' device) for a batch of token ids, from an empty KV cache."""
        import onnxruntime as ort

        self._check_adapter(adapter)
        session = self._ort()
        decoder = self.genai_config["model"]["decoder"]
        ids = input_ids.cpu().numpy().astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        empty = np.zeros((len(ids), decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
        names = {i.name for i in session.get_inputs()}
        for name in names:
            if name.startswith("past_key_values."):
                feeds[name] = empty
        run_options = None
        if adapter is not None:
            if adapter not in self._ort_adapters:
                lora = ort.LoraAdapter()
                lora.Load(str(self.adapter_files[adapter]))
                self._ort_adapters[adapter] = lora
            run_options = ort.RunOptions()
            run_options.add_active_adapter(self._ort_adapters[adapter])
        (logits,) = session.run(["logits"], feeds, run_options)
        return SimpleNamespace(logits=torch.from_numpy(logits).to(input_ids.device))  # where the caller's ids are

    def eval(self):
        return self


def onnx_generate(
    lm: OnnxLM,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 40,
    chat: bool = True,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    adapter: str | None = None,
) -> str:
    """:func:`lorakit.generate` for an exported model: the same prompt text (chat template or not), tokenized
    by the same transformers tokenizer, the same settings; the new text only."""
    from lorakit.models import _check_generation, chat_prompt

    _check_generation(max_new_tokens, temperature, top_p, repetition_penalty, None)
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    ids = tokenizer(text)["input_ids"]
    new = lm.generate_ids(
        ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        adapter=adapter,
    )
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def onnx_tokens_per_second(
    lm: OnnxLM, tokenizer, prompt: str, new_tokens: int = 32, repeats: int = 3, adapter: str | None = None
) -> float:
    """Greedy decoding speed with the KV cache, as :func:`lorakit.tokens_per_second` measures it: exactly
    ``new_tokens`` after ``prompt`` (no early stop), the median of ``repeats`` runs after one warm-up."""
    from lorakit.timing import median_time

    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"need new_tokens >= 1 and repeats >= 1, got new_tokens={new_tokens}, repeats={repeats}")
    ids = tokenizer(prompt)["input_ids"]

    def run():
        lm.generate_ids(ids, new_tokens, min_new_tokens=new_tokens, adapter=adapter)

    return new_tokens / median_time(run, repeats=repeats, warmup=1)


# --------------------------------------------------------------------------- adapters over one base
def _make_lora_inputs(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Turn every LoRA weight of the exported graph into an optional model input, in place.

    Each becomes a graph input whose rank dimension is named ``lora_r`` (so adapters of any rank fit),
    with an empty default (rank 0): without an active adapter the LoRA path adds zeros, the base alone.
    Returns ``{input name: (d_in, r) or (r, d_out) as exported}``.
    """
    import onnx_ir as ir

    model = ir.load(str(model_path))
    ir.external_data.load_to_model(model)
    shapes = {}
    for name, value in list(model.graph.initializers.items()):
        match = LORA_PARAM.match(name)
        if not match:
            continue
        d0, d1 = value.const_value.shape
        shapes[name] = (d0, d1)
        if match["part"] == "lora_A":  # (d_in, r)
            value.const_value = ir.tensor(np.zeros((d0, 0), dtype=np.float32), name=name)
            value.shape = ir.Shape([d0, "lora_r"])
        else:  # (r, d_out)
            value.const_value = ir.tensor(np.zeros((0, d1), dtype=np.float32), name=name)
            value.shape = ir.Shape(["lora_r", d1])
        model.graph.inputs.append(value)
    if not shapes:
        raise ValueError(f"{model_path} has no LoRA weights; export it with an adapter first")
    # every tensor is in memory now (load_to_model), so the files can be written over
    ir.save(model, str(model_path), external_data=model_path.name + ".data")
    return shapes


def adapter_parameters(adapter_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """A peft-format adapter as the exported graph's LoRA inputs: ``A^T`` (d_in, r) and ``(alpha / r) B^T``
    (r, d_out) in float32, under the builder's names (the scaling folded into B, as the builder does)."""
    from lorakit.adapter import _split_key, read_adapter

    config, tensors = read_adapter(adapter_dir)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    params = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key, str(adapter_dir))
        t = tensor.float()
        value = t.T if part == "lora_A" else scale * t.T
        params[f"{onnx_module_name(module)}.{part}.MatMul.weight"] = value.contiguous().numpy()
    return params


def write_onnx_adapter(adapter_dir: str | os.PathLike, path: str | os.PathLike, inputs: Mapping[str, tuple]) -> Path:
    """Convert a peft-format adapter into ONNX Runtime's adapter format (``.onnx_adapter``) for a graph whose
    LoRA inputs are ``inputs`` (from the export); refuses an adapter that targets other layers."""
    import onnxruntime as ort

    params = adapter_parameters(adapter_dir)
    if set(params) != set(inputs):
        extra, missing = sorted(set(params) - set(inputs)), sorted(set(inputs) - set(params))
        raise ValueError(
            f"adapter {str(adapter_dir)!r} does not fit the exported base's LoRA layers: "
            f"{len(extra)} of its weights have no input there (e.g. {extra[:1]}), {len(missing)} inputs get no weight "
            f"(e.g. {missing[:1]}); every adapter served over one export must target the same layers"
        )
    for name, value in params.items():
        fixed = inputs[name][0] if "lora_A" in name else inputs[name][1]
        have = value.shape[0] if "lora_A" in name else value.shape[1]
        if have != fixed:
            raise ValueError(
                f"adapter {str(adapter_dir)!r}: {name} has shape {value.shape}, the base needs {fixed} there"
            )
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in params.items()})
    fmt.export_adapter(str(path))
    return Path(path)


def export_onnx_adapters(
    model_dir: str | os.PathLike,
    adapters: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    precision: str = "int4",
    accuracy_level: int | None = None,
    int8: str = "head",
) -> dict[str, Path]:
    """Export the base in ``model_dir`` once, with LoRA inputs, and each adapter ``{name: folder}`` to
    ``out/<name>.onnx_adapter``; returns ``{name: file}``. Load them with ``OnnxLM(out, adapters=...)``."""
    if not adapters:
        raise ValueError("export_onnx_adapters needs at least one adapter")
    out = Path(out)
    first = next(iter(adapters.values()))
    export_onnx(model_dir, out, precision, adapter=first, accuracy_level=accuracy_level, int8=int8)
    inputs = _make_lora_inputs(out / "model.onnx")
    return {
        name: write_onnx_adapter(folder, out / f"{name}{ADAPTER_SUFFIX}", inputs) for name, folder in adapters.items()
    }
