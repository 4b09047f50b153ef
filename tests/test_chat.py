"""lorakit.chat: reading conversations (every bad input named by file and line), the chat template's loss
mask on two template families, padding that keeps EOS, and ``finetune(data=...)`` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from chat_tokenizers import tiny_chat_tokenizer

from lorakit.chat import (
    IGNORE_INDEX,
    DataError,
    assistant_spans,
    length_grouped_batches,
    load_examples,
    pad_batch,
    read_examples,
    split_examples,
    tokenize_conversation,
    tokenize_examples,
)
from lorakit.instruct import wilson_interval

SYSTEM_MULTI = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And the shepherd?"},
    {"role": "assistant", "content": "The LORD"},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from lorakit.assets import require

    return AutoTokenizer.from_pretrained(str(require("smollm2-135m-instruct")))


def counted_text(tokenizer, messages) -> list[str]:
    """The decoded runs of tokens whose labels count."""
    ids, labels = tokenize_conversation(tokenizer, messages)
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == i
            current.append(i)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_smollm2_mask_counts_the_answers_and_their_end_of_turn_only(smol_tokenizer):
    assert counted_text(smol_tokenizer, SYSTEM_MULTI) == ["Paris<|im_end|>\n", "The LORD<|im_end|>\n"]
    ids, labels = tokenize_conversation(smol_tokenizer, SYSTEM_MULTI)
    assert ids == smol_tokenizer.apply_chat_template(SYSTEM_MULTI, tokenize=True)["input_ids"]
    assert sum(label == smol_tokenizer.eos_token_id for label in labels) == 2  # each answer's EOS counts
    # no system turn: the template adds its own, and it does not count either
    runs = counted_text(smol_tokenizer, SYSTEM_MULTI[1:3])
    assert runs == ["Paris<|im_end|>\n"]


@pytest.mark.parametrize(
    "family, expected",
    [("chatml", ["Paris<|im_end|>\n", "The LORD<|im_end|>\n"]), ("llama3", ["Paris<|eot_id|>", "The LORD<|eot_id|>"])],
)
def test_masks_on_two_template_families(family, expected):
    tokenizer = tiny_chat_tokenizer(family)
    assert counted_text(tokenizer, SYSTEM_MULTI) == expected
    ids, spans = assistant_spans(tokenizer, SYSTEM_MULTI)
    assert len(spans) == 2 and all(
        ids[end - 1 if family == "llama3" else end - 2] == tokenizer.eos_token_id for _, end in spans
    )


def test_padding_keeps_every_eos_when_pad_is_eos():
    tokenizer = tiny_chat_tokenizer("chatml")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = tokenize_conversation(tokenizer, SYSTEM_MULTI[1:3])
    long = tokenize_conversation(tokenizer, SYSTEM_MULTI)
    batch = pad_batch([short[0], long[0]], [short[1], long[1]], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, len(long[0]))
    eos = tokenizer.eos_token_id
    assert int((batch["labels"][0] == eos).sum()) == 1 and int((batch["labels"][1] == eos).sum()) == 2
    assert batch["attention_mask"][0].sum() == len(short[0])
    assert (batch["labels"][0, len(short[0]) :] == IGNORE_INDEX).all()


def test_long_examples_are_dropped_or_truncated_and_counted(smol_tokenizer):
    from lorakit.chat import Example

    examples = [Example(tuple(SYSTEM_MULTI)), Example(tuple(SYSTEM_MULTI[:3]))]
    n_short = len(tokenize_conversation(smol_tokenizer, SYSTEM_MULTI[:3])[0])
    dropped = tokenize_examples(smol_tokenizer, examples, max_len=n_short)
    assert dropped.too_long == 1 and len(dropped.input_ids) == 1 and "1 over" in dropped.report()
    cut = tokenize_examples(smol_tokenizer, examples, max_len=n_short, too_long="truncate")
    assert cut.too_long == 1 and [len(x) for x in cut.input_ids] == [n_short, n_short]
    with pytest.raises(ValueError, match="no example is left"):
        tokenize_examples(smol_tokenizer, examples, max_len=3)


def test_batches_are_grouped_by_length_and_cover_every_example_once():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47] * 4
    batches = length_grouped_batches(lengths, batch_size=4, seed=0, group=8)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) <= 3  # short with short, long with long
    assert batches == length_grouped_batches(lengths, batch_size=4, seed=0, group=8)


def test_jsonl_and_csv_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": SYSTEM_MULTI}, "", {"prompt": "Capital of Peru?", "completion": "Lima"}],
    )
    examples = load_examples(path)
    assert [e.line for e in examples] == [1, 3] and examples[1].answer == "Lima"
    assert examples[0].messages[0]["role"] == "system" and len(examples[0].messages) == 5
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('question,answer\n"Capital of Peru?",Lima\n"Two, plus two?","4"\n')
    rows = load_examples(csv_path, prompt_column="question", completion_column="answer")
    assert [(e.prompt[0]["content"], e.answer, e.line) for e in rows] == [
        ("Capital of Peru?", "Lima", 2),
        ("Two, plus two?", "4", 3),
    ]
    train, test = split_examples(list(range(20)), 0.25, seed=1)
    assert len(test) == 5 and (train, test) == split_examples(list(range(20)), 0.25, seed=1)


GOOD = {"prompt": "Hi?", "completion": "Hello"}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "Hi?", "completion": "Hello"', "d.jsonl:2: invalid JSON"),
        ({"prompt": "Hi?"}, "d.jsonl:2: missing key 'completion'"),
        ({"question": "Hi?"}, "d.jsonl:2: missing key 'prompt'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "d.jsonl:2: turn 0 has unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "turn 1 .* empty"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "of type int"),
        ({"prompt": "Hi?", "completion": None}, "d.jsonl:2: turn 1 \\(assistant\\) has content of type NoneType"),
        ({"messages": [{"role": "user", "content": "x"}]}, "d.jsonl:2: the conversation has no assistant turn"),
        ({"messages": [{"role": "user"}]}, 'd.jsonl:2: turn 0 must be an object with "role" and "content"'),
        ({"messages": []}, 'd.jsonl:2: "messages" must be a non-empty list'),
        ('["a list"]', "d.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_every_bad_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError, match=message) as error:
        load_examples(path)
    assert error.value.line == 2


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="unknown format '.txt'"):
        load_examples(tmp_path / "d.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no valid example"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "d.csv").write_text("q,a\nx,y\n")
    with pytest.raises(DataError, match="d.csv:1: missing column 'prompt'"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("prompt,completion\nx,\n")
    with pytest.raises(DataError, match="e.csv:2: turn 1 \\(assistant\\) has empty content"):
        load_examples(tmp_path / "e.csv")
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_examples(tmp_path / "missing.jsonl")


def test_reading_is_a_stream(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3 + ["not json"])
    stream = read_examples(path)
    assert next(stream).answer == "Hello"  # the bad line 4 is not read yet
    with pytest.raises(DataError, match=":4: invalid JSON"):
        list(stream)


def test_wilson_interval():
    low, high = wilson_interval(0, 200)
    assert low == 0.0 and 0.018 < high < 0.02  # a real interval at 0 correct
    low, high = wilson_interval(122, 200)
    assert 0.54 < low < 0.542 and 0.674 < high < 0.676
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_answer_accuracy_equals_greedy_generation_on_a_tiny_model():
    from tiny_models import tiny_llama

    from lorakit.chat import Example
    from lorakit.instruct import answer_accuracy
    from lorakit.models import generate

    tokenizer = tiny_chat_tokenizer("chatml")
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=128)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    examples = []
    for q in ("Hello!", "How are you?", "Paris?", "The LORD?"):
        context = [{"role": "user", "content": q}]
        text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        greedy = generate(model, tokenizer, text, max_new_tokens=4, chat=False)
        examples.append(Example((*context, {"role": "assistant", "content": greedy or "x"})))
        examples.append(Example((*context, {"role": "assistant", "content": "Genesis"})))
    acc = answer_accuracy(model, tokenizer, examples)
    assert acc.n == 8 and acc.low <= acc.value <= acc.high
    # a greedy reply that stopped within 4 tokens is an exact match; "Genesis" is not the greedy answer
    stopped = []
    for e in examples[::2]:
        text = tokenizer.apply_chat_template(list(e.prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text)["input_ids"]
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )
        stopped.append(out[0, -1].item() == tokenizer.eos_token_id and e.answer != "x")
    assert list(acc.hits[::2]) == stopped
    assert not any(acc.hits[1::2])


def test_chat_session_and_control_without_a_browser():
    from tiny_models import tiny_llama

    from lorakit.chat_session import ChatSession
    from lorakit.widgets.chat import ChatControl, chat_figure, mask_html

    tokenizer = tiny_chat_tokenizer("chatml")
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=5)
    first = session.send("Hello!")
    second = session.send("How are you?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == (first or "(no reply)")
    assert session.context().startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!")
    assert session.transcript().splitlines()[0] == "user: Hello!" and second == ChatSession(
        model, tokenizer, system="Be brief.", max_new_tokens=5, messages=[dict(m) for m in session.messages[:3]]
    ).send("How are you?")  # greedy: the same conversation gives the same reply
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    with pytest.raises(ValueError, match="non-empty message"):
        session.send("  ")

    control = ChatControl(model, tokenizer, max_new_tokens=5)
    control.controls["message"].value = "Hello!"
    control.controls["send"].click()  # as the mouse does
    assert control.reply is not None and control.controls["message"].value == ""
    assert "Hello!" in control.log.value and control.png().startswith(b"\x89PNG")
    assert any("Hello!" in t.get_text() for t in chat_figure(control.session).texts)
    ids, labels = tokenize_conversation(tokenizer, SYSTEM_MULTI)
    html = mask_html(tokenizer, ids, labels)
    assert html.count("background:#b7e4b0;color:#000") == sum(label != IGNORE_INDEX for label in labels)
