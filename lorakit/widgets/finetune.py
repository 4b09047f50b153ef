"""Notebook 06's controls: rank and bit-width controls over :func:`lorakit.finetune.report.setting_report`,
a Train button over a :class:`lorakit.finetune.report.RunBoard`, and their pictures."""

from __future__ import annotations

import html

import torch
from matplotlib.figure import Figure

from lorakit.codebooks import BITS, KINDS
from lorakit.finetune.report import RANKS, Run, RunBoard, SettingReport, block_weights, setting_report
from lorakit.memory import MB
from lorakit.widgets.picture import PicturedControl, default_style, figure_png, new_figure, text_figure


def runs_figure(runs: list[Run]) -> Figure:
    """Held-out perplexity before and after each run (:attr:`RunBoard.runs`), as a bar chart."""
    with default_style():
        fig = new_figure(7.5, 2.6)
        ax = fig.add_subplot()
        labels = [f"{i}: {r.label}" for i, r in enumerate(runs, 1)]
        x = list(range(len(runs)))
        ax.bar([i - 0.2 for i in x], [r.ppl_before for r in runs], width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], [r.ppl_after for r in runs], width=0.4, label="after")
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("runs")
        ax.legend()
    return fig


def memory_figure(report: SettingReport | str) -> Figure:
    """The memory lines of one setting beside LoRA on an unquantized base, as stacked bars (MB).

    An invalid setting (the error text) is drawn as text: the picture always says what is shown.
    """
    if isinstance(report, str):
        return text_figure(report, title="invalid setting")
    with default_style():
        fig = new_figure(7.5, 2.6)
        ax = fig.add_subplot()
        rows = ((0, report.memory), (1, report.lora_memory))
        names = list(dict.fromkeys(name for _, estimate in rows for name in estimate.lines()))  # both rows' lines
        colors = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per line, in both bars
        labelled = set()
        for row, estimate in rows:
            left = 0.0
            for name, value in estimate.lines().items():
                mb = value / MB
                ax.barh(row, mb, left=left, color=colors[name], label=None if name in labelled else name)
                labelled.add(name)
                left += mb
            ax.text(left, row, f" {left:,.0f} MB", va="center")
        ax.set_yticks([0, 1], [f"QLoRA {report.quant_type}{report.bits}", "LoRA"])
        ax.set_xlabel("MB for one training step (estimated)")
        ax.set_title(
            f"rank {report.rank}: {report.trainable_params:,} trainable params, "
            f"quantization error {report.quantization.relative_error:.1%}",
            fontsize=10,
        )
        ax.legend(fontsize=7, loc="lower right")
        ax.margins(x=0.3)
    return fig


def loss_figure(losses: list[float], total_steps: int | None = None) -> Figure:
    """The training loss per step so far (the live plot while a run trains)."""
    with default_style():
        fig = new_figure(7.5, 2.2)
        ax = fig.add_subplot()
        ax.plot(range(1, len(losses) + 1), losses, marker=".")
        if total_steps:
            ax.set_xlim(0, total_steps + 1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    return fig


class FinetuneControl(PicturedControl):
    """Rank and bit-width controls that redraw the report at once, and a Train button for a :class:`RunBoard`.

    ``controls`` holds the ipywidgets by name (``"rank"``, ``"bits"``, ``"quant_type"``); setting a
    control's ``value`` from code recomputes, as moving it with the mouse does. ``report`` is the
    last :class:`SettingReport` (or the error text of an invalid setting); ``train()`` does what the
    button does; ``board`` keeps the runs. The picture (for readers without a kernel) is the
    report's :func:`memory_figure`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        board: RunBoard | None = None,
        rank: int = 8,
        bits: int = 4,
        quant_type: str = "nf",
        **report_settings,
    ):
        import ipywidgets as widgets

        self.model, self.report_settings = model, report_settings
        self.weights = block_weights(model)
        self.board = board or RunBoard()
        self.controls = {
            "rank": widgets.IntSlider(
                value=rank, min=RANKS[0], max=RANKS[1], description="rank", continuous_update=False
            ),
            "bits": widgets.SelectionSlider(
                options=list(BITS), value=bits, description="bits", continuous_update=False
            ),
            "quant_type": widgets.Dropdown(options=list(KINDS), value=quant_type, description="data type"),
        }
        self.text = widgets.HTML()
        self.plot = widgets.Image(format="png")
        self.button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.progress = widgets.Output()  # the tqdm bar of the running fine-tune
        self.loss_plot = widgets.Image(format="png")
        self.runs_text = widgets.HTML()
        self.runs_plot = widgets.Image(format="png")
        parts = {
            **self.controls,
            "report": self.text,
            "plot": self.plot,
            "train": self.button,
            "progress": self.progress,
            "loss": self.loss_plot,
            "runs": self.runs_text,
            "runs-plot": self.runs_plot,
        }
        for name, part in parts.items():
            part.add_class(f"lorakit-finetune-{name}")  # for the browser tests' selectors
        self.widget = widgets.VBox(list(parts.values()))
        self.report: SettingReport | str | None = None
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")
        self.button.on_click(lambda button: self.train())
        self.update()

    def settings(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def update(self) -> SettingReport | str:
        """Recompute the report from the controls; show the picture, then the text."""
        s = self.settings()
        try:
            self.report = setting_report(
                self.model, s["rank"], s["bits"], s["quant_type"], weights=self.weights, **self.report_settings
            )
        except ValueError as err:
            self.report = str(err)
        self.plot.value = self.png()  # the picture first: once the text shows a setting, so does the plot
        self.text.value = f"<pre>{html.escape(str(self.report))}</pre>"
        self.button.disabled = not isinstance(self.report, SettingReport)
        return self.report

    def figure(self) -> Figure:
        return memory_figure(self.report)

    def train(self) -> Run | None:
        """Run a short fine-tune at the current setting (nothing for an invalid one); add it to the runs."""
        if not isinstance(self.report, SettingReport):
            return None
        s = self.settings()
        steps = self.board.train_settings.get("steps")
        self.button.disabled = True
        try:
            self.progress.outputs = ()
            with self.progress:  # the tqdm bar shows here
                run = self.board.train(
                    s["rank"],
                    s["bits"],
                    s["quant_type"],
                    on_step=lambda r: setattr(self.loss_plot, "value", figure_png(loss_figure(r.losses, steps))),
                )
            self.runs_plot.value = figure_png(runs_figure(self.board.runs))
            self.runs_text.value = self.board.html()
            return run
        finally:
            self.button.disabled = False
