"""Notebook 05's memory calculator: :func:`lorakit.memory.check_fit` behind a few controls, and its picture."""

from __future__ import annotations

from matplotlib.figure import Figure

from lorakit.memory import GB, LLAMA, METHODS, FitCheck, check_fit
from lorakit.memory.estimate import DTYPE_BYTES, STATE_BYTES_PER_PARAM
from lorakit.widgets.picture import PicturedControl, default_style, new_figure, text_figure

BAR_COLORS = ["tab:blue", "tab:cyan", "tab:purple", "tab:orange", "tab:red", "tab:olive", "tab:gray"]


def fit_figure(check: FitCheck) -> Figure:
    """The calculator's picture: the estimate's lines stacked into one bar, against the GPU's memory."""
    with default_style():
        fig = new_figure(9.0, 2.4)
        ax = fig.subplots()
        left = 0.0
        for (name, n), color in zip(check.estimate.lines().items(), BAR_COLORS * 3):
            ax.barh(0, n / GB, left=left, color=color, label=f"{name}: {n / GB:,.2f} GB")
            left += n / GB
        ax.axvline(check.gpu_bytes / GB, color="k", ls="--", lw=1.5, label=f"GPU: {check.gpu_bytes / GB:g} GB")
        ax.set(yticks=[], xlabel="GB (10^9 bytes)", xlim=(0, 1.05 * max(left, check.gpu_bytes / GB)))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_title(str(check).splitlines()[0], fontsize=10, color="tab:green" if check.fits else "tab:red")
    return fig


class MemoryCalculator(PicturedControl):
    """A thin ipywidgets front end to :func:`lorakit.memory.check_fit`: controls in, verdict and breakdown out.

    Drive it from code as a learner would with the mouse::

        calc = MemoryCalculator()
        calc.controls["model"].value = "65B"; calc.update()
        calc.result.fits
    """

    def __init__(
        self,
        model: str = "7B",
        method: str = "qlora",
        bits: int = 4,
        rank: int = 64,
        batch_size: int = 1,
        seq_len: int = 512,
        gradient_checkpointing: bool = True,
        optimizer: str = "adamw",
        adapter_dtype: str = "float32",
        gpu_gb: float = 24.0,
    ):
        import ipywidgets as w

        self.controls = {
            "model": w.Dropdown(options=["135M", "1B", *LLAMA], value=model, description="model"),
            "method": w.Dropdown(options=list(METHODS), value=method, description="method"),
            "bits": w.Dropdown(options=[4, 8, 16, 32], value=bits, description="bits"),
            "rank": w.IntSlider(value=rank, min=1, max=256, description="rank"),
            "batch_size": w.IntSlider(value=batch_size, min=1, max=64, description="batch"),
            "seq_len": w.IntSlider(value=seq_len, min=64, max=8192, step=64, description="seq len"),
            "gradient_checkpointing": w.Checkbox(value=gradient_checkpointing, description="checkpointing"),
            "optimizer": w.Dropdown(options=list(STATE_BYTES_PER_PARAM), value=optimizer, description="optimizer"),
            "adapter_dtype": w.Dropdown(options=list(DTYPE_BYTES), value=adapter_dtype, description="adapters"),
            "gpu_gb": w.FloatSlider(value=gpu_gb, min=4, max=192, step=4, description="GPU GB"),
        }
        self.output = w.Output()
        self.widget = w.VBox([*self.controls.values(), self.output])
        self.result: FitCheck | None = None
        self.error: str | None = None
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def update(self) -> FitCheck | None:
        """Recompute from the controls; an impossible combination (bits=4 with full) shows its error."""
        kwargs = {k: c.value for k, c in self.controls.items()}
        gpu_gb = kwargs.pop("gpu_gb")
        self.output.clear_output()
        try:
            self.result, self.error = check_fit(gpu_gb, **kwargs), None
        except ValueError as e:
            self.result, self.error = None, str(e)
        with self.output:
            print(self.result if self.result is not None else f"cannot estimate: {self.error}")
        return self.result

    def figure(self) -> Figure:
        """The picture of the current state (the book shows it): :func:`fit_figure`, or the error."""
        if self.result is None:
            return text_figure(f"cannot estimate: {self.error}")
        return fit_figure(self.result)
