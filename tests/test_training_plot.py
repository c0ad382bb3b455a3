"""The loss-curve PNG says what happened: markers for single points, the base's level, integer steps."""
from __future__ import annotations

from matplotlib.collections import PathCollection
from matplotlib.lines import Line2D

from loradex.training.plot import loss_figure, loss_png, method_label


def _legend(ax) -> dict:
    legend = ax.get_legend()
    return {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}


def test_one_held_out_point_is_a_marker_and_the_base_a_line():
    fig = loss_figure([[1, 2.0], [2, 1.5]], title="t", eval_points=[[2, 1.7]], base_loss=2.1)
    ax = fig.axes[0]
    handles = _legend(ax)
    held = handles["held-out loss"]
    assert isinstance(held, (Line2D, PathCollection))
    if isinstance(held, Line2D):  # a marker legend entry, not a dashed line over one dot
        assert held.get_linestyle() in ("None", "none", " ", "") and held.get_marker() not in (None, "None", "")
    base = [line for line in ax.get_lines() if line.get_label() == "base held-out loss"]
    assert len(base) == 1 and list(base[0].get_ydata()) == [2.1, 2.1]


def test_several_held_out_points_are_a_line_and_steps_are_integers():
    fig = loss_figure([[1, 2.0], [2, 1.5]], title="t", eval_points=[[1, 1.9], [2, 1.7]])
    ax = fig.axes[0]
    assert _legend(ax)["held-out loss"].get_linestyle() == "--"
    assert "base held-out loss" not in _legend(ax)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_title_names_the_method(tmp_path):
    assert method_label("none", "fp32") == "LoRA fp32" and method_label("nf4", "fp32") == "QLoRA nf4"
    assert method_label("none", "bf16") == "LoRA bf16"
    png = loss_png([[1, 1.0]], tmp_path / "x.png", title="a (LoRA fp32)")
    assert png.read_bytes()[:4] == b"\x89PNG"
