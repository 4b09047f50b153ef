"""The GGUF route: the merged model written as a llama.cpp file with the ``gguf`` package, back in the
format the base came in (SmolLM2 was shipped as a Q4_1 GGUF file, notebook 00).

Two types, both blockwise with 32 weights per block along each row, as llama.cpp stores them:

``q8_0``
    ``w ~ d * q``: one float16 scale ``d = absmax / 127`` and 32 signed 8-bit codes per block (34 bytes:
    8.5 bits per weight).
``q4_1``
    ``w ~ d * q + m``: a float16 scale ``d = (max - min) / 15``, a float16 offset ``m = min`` and 32
    unsigned 4-bit codes per block (20 bytes: 5 bits per weight). As in the base's own file, the token
    embedding (which the tied output head shares) stays Q8_0.

Norm weights stay float32. The file holds the tokenizer as llama.cpp reads it (``tokenizer.ggml.*``: the
byte-level BPE vocabulary, its merges, token types, the special ids and the chat template), and the query
and key projections in llama.cpp's rotary layout (the permutation of ``convert_hf_to_gguf.py``).
:func:`read_gguf` loads a file back with transformers (``gguf_file=``), which dequantizes it;
:func:`gguf_roundtrip` builds the same weights in memory, the reference a file is checked against.
:class:`LlamaCppLM` runs a file in llama.cpp itself (the optional ``llama-cpp-python`` binding, which pip
compiles from source): greedy generation, tokens per second (:func:`llama_cpp_tokens_per_second`) and logits.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

GGUF_TYPES = ("q8_0", "q4_1")
BLOCK = 32  # weights per block, both types


def _types(qtype: str):
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {qtype!r} is not one of {GGUF_TYPES}")
    return {"q8_0": (T.Q8_0, F.MOSTLY_Q8_0), "q4_1": (T.Q4_1, F.MOSTLY_Q4_1)}[qtype]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotary layout (halves) -> llama.cpp's (interleaved pairs), per head (``convert_hf_to_gguf``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_tensors(model: torch.nn.Module, qtype: str) -> dict[str, tuple[np.ndarray, object]]:
    """``{gguf name: (float32 weight, GGML type)}``: every tensor the file holds, in llama.cpp's layout."""
    from gguf import GGMLQuantizationType as T

    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"the GGUF writer handles Llama models (SmolLM2), not {config.model_type!r}")
    linear, _ = _types(qtype)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = {}
    for key, value in model.state_dict().items():
        w = value.detach().float().cpu().numpy()
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = (w, T.Q8_0)
        elif key == "model.norm.weight":
            out["output_norm.weight"] = (w, T.F32)
        elif key == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = (w, linear)
        elif key.startswith("model.layers."):
            i, rest = key[len("model.layers.") :].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module not in _NAMES or kind != "weight":
                raise ValueError(f"the GGUF writer does not know the tensor {key!r}")
            if module == "self_attn.q_proj":
                w = _permute(w, n_head)
            elif module == "self_attn.k_proj":
                w = _permute(w, n_kv)
            out[f"blk.{i}.{_NAMES[module]}.weight"] = (w, T.F32 if w.ndim == 1 else linear)
        else:
            raise ValueError(f"the GGUF writer does not know the tensor {key!r}")
    for name, (w, t) in out.items():
        if t != T.F32 and w.shape[-1] % BLOCK:
            raise ValueError(f"{name} has rows of {w.shape[-1]} weights; GGUF's {qtype} needs a multiple of {BLOCK}")
    return out


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """llama.cpp's ``tokenizer.ggml.*`` keys for a byte-level BPE tokenizer (what ``convert_hf_to_gguf`` writes)."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ValueError(f"the GGUF writer handles byte-level BPE tokenizers, not {backend['model']['type']!r}")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(token)
            special = token in added and added[token].special
            kind = TokenType.CONTROL if special else TokenType.USER_DEFINED if token in added else TokenType.NORMAL
            types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if len(vocab) == 49152 else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, qtype: str = "q4_1", name: str = "") -> Path:
    """Write a (merged) Llama model and its tokenizer to one GGUF file of type ``qtype`` (``"q8_0"`` or ``"q4_1"``)."""
    import gguf

    _, file_type = _types(qtype)
    config = model.config
    tensors = gguf_tensors(model, qtype)  # checks before anything is written
    path = Path(path)
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.WARNING)  # gguf's writer logs each file it writes at INFO
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        writer.add_name(name or path.stem)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor_name, (w, t) in tensors.items():
            if t == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor_name, w.astype(np.float32))
            else:
                writer.add_tensor(tensor_name, gguf.quants.quantize(w, t), raw_dtype=t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
        logger.setLevel(level)
    return path


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, tokenizer: bool = False):
    """Load a GGUF file with transformers (``gguf_file=``; its kernels compute in float32, the default): the model, or
    ``(model, tokenizer)`` with the tokenizer rebuilt from the file's ``tokenizer.ggml.*`` keys."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import _quiet

    path = Path(path)
    with _quiet.loading():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    if not tokenizer:
        return model
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@torch.no_grad()
def gguf_roundtrip(model: torch.nn.Module, qtype: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of ``model`` (in ``dtype``, default its own) whose weights went through the file's quantization and
    back, in memory: what a correct GGUF file of ``qtype`` must load as (the quantization error alone, no error
    of the file's layout). transformers computes a GGUF model in float32: compare in float32."""
    import gguf

    result = copy.deepcopy(model).to(dtype or next(model.parameters()).dtype)
    tensors = gguf_tensors(model, qtype)
    config = model.config
    names = {v: k for k, v in _NAMES.items()}
    for tensor_name, (w, t) in tensors.items():
        if t == gguf.GGMLQuantizationType.F32:
            continue
        deq = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
        if tensor_name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif tensor_name == "output.weight":
            key = "lm_head.weight"
        else:
            _, i, short, _ = tensor_name.split(".")
            key = f"model.layers.{i}.{names[short]}.weight"
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(short)
            if heads:  # undo the rotary permutation
                deq = _unpermute(deq, heads)
        param = result.get_parameter(key)
        param.copy_(torch.from_numpy(np.ascontiguousarray(deq)).to(param.dtype))
    return result


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF's Q8_0 of ``w`` (rows, cols), ``cols`` a multiple of 32, as llama.cpp's ``quantize_row_q8_0``:
    per block of 32 along each row, ``d = absmax / 127`` and ``q = round(w / d)`` rounded half away from
    zero; ``d`` is stored as float16 (the codes use the float32 ``d``).
    Returns ``(codes int8 (rows, cols), scales float16 (rows, cols // 32))``.
    """
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"Q8_0 needs rows of a multiple of {BLOCK} weights, got {cols}")
    blocks = w.float().reshape(rows, cols // BLOCK, BLOCK)  # (rows, n_blocks, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # (rows, n_blocks, 1)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inverse
    codes = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # half away from zero, as C's roundf
    return codes.to(torch.int8).reshape(rows, cols), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``d * q`` per block: the float32 weights a Q8_0 tensor stands for, ``(rows, cols)``."""
    rows, cols = codes.shape
    blocks = codes.float().reshape(rows, cols // BLOCK, BLOCK) * scales.float().unsqueeze(-1)
    return blocks.reshape(rows, cols)


# --------------------------------------------------------------------------- running a file in llama.cpp
LLAMA_CPP_HINT = (
    "llama.cpp's Python binding is not installed: pip install 'llama-cpp-python==0.3.36' "
    "(PyPI has only its source, so pip compiles llama.cpp: a few minutes on 2 cores, cmake and a C++ compiler needed)"
)


def llama_cpp_available() -> bool:
    """Whether ``llama_cpp`` (the ``llama-cpp-python`` package) can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppLM:
    """A GGUF file run by llama.cpp (through ``llama-cpp-python``), on ``threads`` CPU threads (default: torch's).

    ``generate_ids`` decodes greedily with llama.cpp's KV cache; ``model(input_ids=...)`` returns the logits of
    every position (``logits=True`` only: llama.cpp then computes the output head for every token).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, n_ctx: int = 512, logits: bool = False):
        if not llama_cpp_available():
            raise ModuleNotFoundError(LLAMA_CPP_HINT)
        from llama_cpp import Llama

        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.logits_all = logits
        self.llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=logits,
            verbose=False,
        )
        self.n_ctx = n_ctx
        self.eos = self.llm.token_eos()
        # free llama.cpp's model when this object goes, or at exit before Python tears down the binding's globals
        self._finalizer = weakref.finalize(self, self.llm.close)

    def __repr__(self) -> str:
        return f"LlamaCppLM({self.path.name!r}, threads={self.threads})"

    def tokenize(self, text: str) -> list[int]:
        """The token ids llama.cpp's own tokenizer gives ``text`` (from the file's ``tokenizer.ggml.*`` keys),
        without a BOS token and with special tokens read as text: what ``tokenizer(text)["input_ids"]`` gives."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def generate_ids(self, ids: list[int], max_new_tokens: int, *, min_new_tokens: int = 0) -> list[int]:
        """The new token ids after ``ids``, greedy (the most likely token each step, as :func:`lorakit.generate`
        with ``temperature=0``), from an empty KV cache; stops at EOS unless ``min_new_tokens`` forbids it."""
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(np.argmax(self._last_logits()))
            if token == self.eos and len(new) >= min_new_tokens:
                break
            new.append(token)
            if len(new) < max_new_tokens:
                self.llm.eval([token])
        return new

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        """Logits ``(B, T, vocab)`` (float32, on the ids' device), each row from an empty KV cache."""
        if not self.logits_all:
            raise ValueError("this LlamaCppLM computes the last position only; open it with logits=True")
        rows = []
        for row in input_ids.cpu().tolist():
            if len(row) > self.n_ctx:
                raise ValueError(f"{len(row)} tokens exceed the context of {self.n_ctx}")
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows).to(input_ids.device))

    def eval(self):
        return self

    def close(self) -> None:
        self._finalizer()


def llama_cpp_generate(lm: LlamaCppLM, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = True) -> str:
    """:func:`lorakit.generate` (greedy) for a GGUF file in llama.cpp: the same prompt text, tokenized by the same
    transformers tokenizer (llama.cpp's own tokenizer reads the file's ``tokenizer.ggml.*`` keys); the new text only."""
    from lorakit.models import chat_prompt

    text = chat_prompt(tokenizer, prompt) if chat else prompt
    new = lm.generate_ids(tokenizer(text)["input_ids"], max_new_tokens)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def llama_cpp_tokens_per_second(
    lm: LlamaCppLM, tokenizer, prompt: str, new_tokens: int = 32, repeats: int = 3
) -> float:
    """Greedy decoding speed in llama.cpp, as :func:`lorakit.tokens_per_second` measures transformers: exactly
    ``new_tokens`` after ``prompt`` (no early stop; the time includes reading the prompt), divided by the median
    time of ``repeats`` runs after one warm-up."""
    from lorakit.timing import median_time

    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"need new_tokens >= 1 and repeats >= 1, got new_tokens={new_tokens}, repeats={repeats}")
    ids = tokenizer(prompt)["input_ids"]
    return new_tokens / median_time(lambda: lm.generate_ids(ids, new_tokens, min_new_tokens=new_tokens), repeats, 1)
