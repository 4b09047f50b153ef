"""Notebook 07's chat control: a text box, a send button and the conversation, over :class:`ChatSession`."""

from __future__ import annotations

from matplotlib.figure import Figure

from lorakit.chat_session import ChatSession
from lorakit.widgets.picture import PicturedControl, text_figure


def chat_figure(session: ChatSession, width: int = 90) -> Figure:
    """The control's picture: the conversation so far, one line per turn (long turns cut at ``width``)."""
    lines = []
    for m in session.messages:
        if m["role"] == "system":
            continue
        text = " ".join(m["content"].split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"{m['role']:>9}: {text}")
    return text_figure("\n".join(lines) or "(no message yet)", title="chat")


class ChatControl(PicturedControl):
    """A chat with ``model``: type in ``controls["message"]``, press ``controls["send"]`` (or call :meth:`send`).

    ``reply`` is the model's last answer; ``session`` holds the whole conversation.
    """

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 40):
        import ipywidgets as widgets

        self.session = ChatSession(model, tokenizer, system=system, max_new_tokens=max_new_tokens)
        self.controls = {
            "message": widgets.Text(placeholder="your message", description="you"),
            "send": widgets.Button(description="send"),
        }
        self.log = widgets.HTML()
        self.widget = widgets.VBox([self.log, widgets.HBox([self.controls["message"], self.controls["send"]])])
        self.reply: str | None = None
        self.controls["send"].on_click(lambda _: self.send())
        self.update()

    def send(self, text: str | None = None) -> str:
        """Send ``text`` (default: the text box's value), show the reply, empty the box; returns the reply."""
        text = self.controls["message"].value if text is None else text
        self.reply = self.session.send(text)
        self.controls["message"].value = ""
        self.update()
        return self.reply

    def update(self) -> None:
        import html

        rows = "".join(
            f"<div><b>{m['role']}</b>: {html.escape(m['content'])}</div>"
            for m in self.session.messages
            if m["role"] != "system"
        )
        self.log.value = rows or "<i>no message yet</i>"

    def figure(self) -> Figure:
        return chat_figure(self.session)


def mask_html(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The tokens of one example as HTML, coloured by whether they count in the loss (green) or not (grey).

    Each token is a box (its text with newlines shown as ``\\n``), so token boundaries are visible.
    """
    import html

    from lorakit.chat import IGNORE_INDEX

    boxes = []
    for token, label in zip(input_ids, labels):
        text = tokenizer.decode([token]).replace("\n", "\\n")
        counts = label != IGNORE_INDEX
        style = "background:#b7e4b0;color:#000" if counts else "background:#eee;color:#888"
        boxes.append(
            f'<span style="{style};border:1px solid #ccc;margin:1px;padding:0 2px;'
            f'font-family:monospace;white-space:pre">{html.escape(text)}</span>'
        )
    legend = (
        '<div style="margin-top:4px"><span style="background:#b7e4b0;padding:0 4px">counts in the loss</span> '
        '<span style="background:#eee;color:#888;padding:0 4px">label -100 (ignored)</span></div>'
    )
    return '<div style="line-height:1.9">' + "".join(boxes) + "</div>" + legend
