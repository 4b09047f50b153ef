"""generate (greedy and sampled, against transformers' own generate), chat_prompt, and the narrow
stderr filters of lorakit._quiet (a learner sees no library noise; a genuine warning still shows)."""

from __future__ import annotations

import logging
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

from lorakit import _quiet
from lorakit.models import chat_prompt, generate

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(chat_template: str | None = None):
    """A lower-case character tokenizer for the tiny Llama (37 of its 64 ids): EOS is id 0.

    The tiny Llama's own config says EOS is id 2 ("b"), so a test can tell the two apart."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + " .,;:!?'\n<>"
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(CHAT_TEMPLATE)


def transformers_generate(model, tokenizer, text: str, seed: int | None = None, **settings) -> list[str]:
    """transformers' generate, called directly: the reference for lorakit's wrapper."""
    inputs = tokenizer(text, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**inputs, eos_token_id=[0, 2], pad_token_id=0, **settings)
    return [t.strip() for t in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def test_greedy_default_equals_transformers_greedy(tiny, tok):
    ours = generate(tiny, tok, "to be or not", 12, False)  # the notebooks' positional call
    assert isinstance(ours, str)
    assert ours == transformers_generate(tiny, tok, "to be or not", max_new_tokens=12, do_sample=False)[0]


def test_sampling_equals_transformers_sampling_under_the_same_seed(tiny, tok):
    settings = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    ours = generate(tiny, tok, "to be", 16, chat=False, num_samples=3, seed=5, **settings)
    reference = transformers_generate(tiny, tok, "to be", seed=5, max_new_tokens=16, do_sample=True, top_k=0,
                                      num_return_sequences=3, **settings)
    assert ours == reference
    assert len(set(ours)) > 1  # three different samples


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(tiny, tok):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(tiny, tok, "to be", 16, chat=False, temperature=1.0, num_samples=4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(tiny, tok, "to be", 16, chat=False, temperature=1.0, num_samples=4, seed=1) == first
    assert generate(tiny, tok, "to be", 16, chat=False, temperature=1.0, num_samples=4, seed=2) != first


def test_a_tiny_nucleus_keeps_only_the_top_token_so_sampling_becomes_greedy(tiny, tok):
    greedy = generate(tiny, tok, "to be", 16, chat=False)
    assert generate(tiny, tok, "to be", 16, chat=False, temperature=1.0, top_p=1e-6, num_samples=3, seed=0) == [greedy] * 3
    assert greedy not in generate(tiny, tok, "to be", 16, chat=False, temperature=1.0, num_samples=3, seed=0)


def test_repetition_penalty_breaks_a_greedy_loop(tiny, tok):
    looped = generate(tiny, tok, "to be", 40, chat=False)
    penalized = generate(tiny, tok, "to be", 40, chat=False, repetition_penalty=3.0)
    assert len(set(penalized)) > len(set(looped))  # more distinct characters once repeats are penalized
    assert penalized == transformers_generate(tiny, tok, "to be", max_new_tokens=40, do_sample=False,
                                              repetition_penalty=3.0)[0]


def test_generation_stops_at_the_tokenizers_eos(tok):
    """The tokenizer's EOS (id 0, the token lorakit.data puts between documents) ends the text,
    although the tiny Llama's config names another EOS (id 2)."""
    model = tiny_llama(seed=3)
    assert model.generation_config.eos_token_id != tok.eos_token_id
    calls = []

    def favour_eos(module, args, logits):  # logits (B, T, V): EOS becomes every position's top token
        calls.append(1)
        return logits + 1e4 * torch.nn.functional.one_hot(torch.tensor(tok.eos_token_id), logits.shape[-1])

    model.lm_head.register_forward_hook(favour_eos)
    assert generate(model, tok, "to be", 20, chat=False) == ""
    assert len(calls) == 1  # one forward pass: its token was EOS, and generation stopped


def test_chat_prompt_is_exactly_what_generate_feeds_the_model(tiny, tok):
    text = chat_prompt(tok, "hi there")
    assert text == tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "hi there" in text and text != "hi there"
    assert generate(tiny, tok, "hi there", 12) == generate(tiny, tok, text, 12, chat=False)
    plain = char_tokenizer()  # a base model's tokenizer: no template, the prompt goes in as it is
    assert chat_prompt(plain, "hi there") == "hi there"
    assert generate(tiny, plain, "hi there", 12) == generate(tiny, plain, "hi there", 12, chat=False)


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(top_p=0.9), "top_p=0.9 only acts when sampling"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(temperature=1.0, num_samples=0), "num_samples"),
        (dict(num_samples=3), "num_samples=3 with temperature=0"),
    ],
)
def test_bad_settings_name_the_value(tiny, tok, settings, named):
    with pytest.raises(ValueError, match=named):
        generate(tiny, tok, "to be", **settings)


# --- lorakit._quiet: library noise silenced at the source, genuine warnings kept -----------------

NOISE = ("kernels-community", "is_gradient_checkpointing")
NOISY_SCRIPT = """
import logging, warnings
{prelude}
import bitsandbytes, peft, transformers
config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
tiny = transformers.LlamaForCausalLM(config)  # built here: tests/tiny_models.py imports lorakit
peft.get_peft_model(tiny, peft.LoraConfig(r=2, target_modules=["q_proj"]))  # the FutureWarning
warnings.warn("a genuine FutureWarning", FutureWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a genuine bitsandbytes warning")
"""


def stderr_of(script: str) -> str:
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_importing_through_lorakit_silences_the_noise_and_keeps_genuine_warnings():
    quiet = stderr_of(NOISY_SCRIPT.format(prelude="import lorakit"))
    assert not [n for n in NOISE if n in quiet], quiet
    assert "a genuine FutureWarning" in quiet and "a genuine bitsandbytes warning" in quiet
    # the control: without lorakit the same script prints the noise (the bitsandbytes note only on
    # CPUs with AVX512-BF16, where bitsandbytes looks for the optional kernel)
    from bitsandbytes.functional import has_avx512bf16

    noisy = stderr_of(NOISY_SCRIPT.format(prelude=""))
    assert "is_gradient_checkpointing" in noisy
    assert ("kernels-community" in noisy) == has_avx512bf16()


def test_the_bitsandbytes_filter_drops_one_message_only(caplog):
    _quiet.install()
    _quiet.install()  # idempotent: one filter, not two
    logger = logging.getLogger(_quiet.BNB_CPU_LOGGER)
    assert sum(isinstance(f, _quiet.DropMessage) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=_quiet.BNB_CPU_LOGGER):
        logger.warning(_quiet.BNB_KERNELS_MESSAGE + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("Failed to allocate 4-bit buffer")
    assert [r.getMessage() for r in caplog.records] == ["Failed to allocate 4-bit buffer"]


def test_the_warning_filter_matches_one_message_from_one_module(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet.install()
        assert tiny.is_gradient_checkpointing is False  # transformers' deprecated alias, which peft reads
        warnings.warn("`is_gradient_checkpointing` is deprecated (from this test module)", FutureWarning)
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated (from this test module)"]


@pytest.mark.model
def test_loading_the_base_model_prints_nothing_to_stderr(capfd):
    from lorakit import load_base_model

    capfd.readouterr()
    load_base_model()
    assert capfd.readouterr().err == ""


@pytest.mark.model
def test_smollm2_answers_greedily_and_samples_reproducibly(smollm2):
    model, tokenizer = smollm2
    text = chat_prompt(tokenizer, "What is the capital of France?")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "Paris" in generate(model, tokenizer, "What is the capital of France?", 12)
    samples = generate(model, tokenizer, "ROMEO:", 12, chat=False, temperature=0.8, top_p=0.95, num_samples=2, seed=0)
    assert len(set(samples)) == 2
    assert generate(model, tokenizer, "ROMEO:", 12, chat=False, temperature=0.8, top_p=0.95, num_samples=2, seed=0) == samples
