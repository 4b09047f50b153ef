"""A conversation with a model, turn by turn: the logic behind the chat control (lorakit.widgets.chat).

Each :meth:`ChatSession.send` appends the user's turn, renders the whole conversation with the
tokenizer's chat template and the generation prompt, and lets the model write the assistant's turn
(greedy by default, so a test can assert the reply), which joins the history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.chat import check_messages


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    system: str | None = None  # the system turn, if any (SmolLM2's template adds its own when there is none)
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0: greedy, the same reply every time
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.system is not None and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def context(self) -> str:
        """The text the model continues: the conversation so far and the opened assistant turn."""
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def send(self, text: str) -> str:
        """The user says ``text``; returns the model's reply (also added to ``messages``)."""
        from lorakit.models import generate

        if not isinstance(text, str) or not text.strip():
            raise ValueError("ChatSession.send: write a non-empty message")
        self.messages.append({"role": "user", "content": text})
        reply = generate(
            self.model,
            self.tokenizer,
            self.context(),
            max_new_tokens=self.max_new_tokens,
            chat=False,
            temperature=self.temperature,
        )
        self.messages.append({"role": "assistant", "content": reply or "(no reply)"})
        check_messages(self.messages, "chat", len(self.messages))
        return reply

    def reset(self) -> None:
        """Forget the conversation (the system turn stays)."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]

    def transcript(self) -> str:
        """The conversation as ``role: content`` lines (the system turn left out)."""
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages if m["role"] != "system")
