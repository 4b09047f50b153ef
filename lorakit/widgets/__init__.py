"""The notebook UI: every ipywidgets control and matplotlib figure, and nothing else.

Each control is thin (STYLE.md): the numbers it shows come from a tested lorakit function, and
the control only wires ipywidgets to it and draws a picture of its state.

* :mod:`~lorakit.widgets.picture`: the base class (a live widget plus a PNG for viewers without a kernel);
* :mod:`~lorakit.widgets.rank`: notebook 01's rank slider over :mod:`lorakit.lowrank`;
* :mod:`~lorakit.widgets.tradeoff`: notebooks 03-04's quantization control over :mod:`lorakit.tradeoff`;
* :mod:`~lorakit.widgets.memory`: notebook 05's memory calculator over :mod:`lorakit.memory`;
* :mod:`~lorakit.widgets.finetune`: notebook 06's controls over :mod:`lorakit.finetune.report`.

The core never imports this package; ``import lorakit`` loads it only when a control is first used.
"""
