"""report.py on hand-made systems and histories: retained-model records, §5.4's transfer rows, Figures 5–7's data,
and the mean ± std over repetitions (no training; the figures of a real tiny run are checked in test_evolve.py)."""

import dataclasses
import math

import jax
import numpy as np
import pytest

import mu2net
import report
import vit

CFG = vit.CONFIGS["tiny"]


def _rec(mid: str, q: float = 0.5, sources=(), uses=None, **hp) -> dict:
    return {"id": mid, "hp": {"mu": 0.2, "num_layers": 2, **hp}, "mu": {}, "quality": q, "score": q, "test": q,
            "params": 100.0, "flops": 1e5, "sources": list(sources), "uses": dict(uses or {})}


def test_retained_traces_sources_and_shared_components():
    """Task b's model trains a clone of block 1; task a's model descends from it and shares that clone frozen."""
    root = vit.init(CFG, jax.random.key(0), 10, 16)
    s = mu2net.new_system(CFG, root, {"resolution": 16})
    rid = {mu2net.kind(c): c for c in s.root.components}
    params = dict(s.params)
    params["encoderblock_1:50"] = params[rid["encoderblock_1"]]
    params["head:51"] = vit.init_head(CFG, 2)
    params["head:52"] = vit.init_head(CFG, 3)
    body = [rid[k] for k in ("embedding", "cls", "posembed_input", "encoderblock_0")]
    mb = mu2net.Model("b/7", "b", (*body, "encoderblock_1:50", rid["encoder_norm"], "head:51"),
                      {"resolution": 16, "num_layers": 2}, {}, mu2net.ROOT, {"quality": 0.9, "test": 0.8})
    ma = mu2net.Model("a/9", "a", (*body, "encoderblock_1:50", rid["encoder_norm"], "head:52"),
                      {"resolution": 16, "num_layers": 2}, {"clone:encoderblock_1": 0.1}, "b/7",
                      {"quality": 0.7, "test": 0.6, "score": 0.69})
    lineage = {**s.lineage, "b/7": (mu2net.ROOT, mb.components), "a/9": ("b/7", ma.components)}
    s = dataclasses.replace(s, params=params, models={"b": mb, "a": ma}, lineage=lineage)
    rec = report.retained(s)
    assert list(rec) == ["b", "a"]
    assert rec["a"]["sources"] == ["b"] and rec["a"]["uses"] == {"b": 1}
    assert rec["b"]["sources"] == [] and rec["b"]["uses"] == {}
    assert report.ancestry(s, ma) == ["b/7"]
    assert (rec["a"]["quality"], rec["a"]["test"], rec["a"]["score"]) == (0.7, 0.6, 0.69)
    assert math.isnan(rec["b"]["score"])
    assert rec["a"]["params"] == mu2net.accounted_params(s, ma)  # eq. 2: the shared block counts half
    assert rec["a"]["mu"] == {"clone:encoderblock_1": 0.1}
    summ = report.summary(s, ["a"], "seg")
    assert summ["retained"] == rec and summ["report_set"] == ["a"]
    assert summ["test_acc_set"] == 0.6 and summ["params"] == np.mean([rec["a"]["params"], rec["b"]["params"]])


def _history():
    """A: a1, a2. Segment 'B' brings b1, b2. In 'A+B', a1 moves to a path descending from b1 that shares 3 of b2's
    components, a2 keeps its model, b1 changes (not in A). a2 also changed in 'plus', before B existed."""
    return [
        {"segment": "start", "retained": {}},
        {"segment": "mu2net", "retained": {"a1": _rec("a1/1", 0.7, lr=0.1), "a2": _rec("a2/2", 0.6, lr=0.1)}},
        {"segment": "plus", "retained": {"a1": _rec("a1/1", 0.7, lr=0.1), "a2": _rec("a2/5", 0.65, lr=0.2)}},
        {"segment": "B", "retained": {"a1": _rec("a1/1", 0.7, lr=0.1), "a2": _rec("a2/5", 0.65, lr=0.2),
                                      "b1": _rec("b1/8", 0.8, lr=0.2), "b2": _rec("b2/9", 0.9, lr=0.5)}},
        {"segment": "A+B", "retained": {
            "a1": _rec("a1/20", 0.75, sources=["b1", "a2"], uses={"b2": 3, "a2": 1}, lr=0.2),
            "a2": _rec("a2/5", 0.65, lr=0.2), "b1": _rec("b1/21", 0.85, lr=0.2), "b2": _rec("b2/9", 0.9, lr=0.5)}},
    ]


def test_transfer_rows_follow_section_5_4():
    rows = report.transfer(_history(), ["a1", "a2"])
    assert [(r["segment"], r["task"], r["before"], r["after"]) for r in rows] == [("A+B", "a1", "a1/1", "a1/20")]
    (r,) = rows
    assert r["via"] == ["b1"] and r["uses"] == {"b2": 3}  # a2 is in A: not counted as B
    assert (r["quality_before"], r["quality_after"]) == (0.7, 0.75)
    text = report.analysis(_history(), ["a1", "a2"], depth=2)
    assert "- A+B: 1 of 2 task-set A tasks found a better-scoring model; 1 of them transfer from at least one " \
           "task-set B task, 1 from two or more." in text
    assert "| A+B | a1 | a1/1 → a1/20 | b1 | b2 (3) | 70.00 → 75.00 |" in text


def test_figure_5_6_7_data():
    h = _history()
    h[-1]["retained"]["a1"]["mu"] = {"clone:encoderblock_0": 0.1, "clone:encoderblock_1": 0.3, "hp:lr": 0.04}
    labels, counts = report.hparam_counts(h)
    assert labels == ["mu2net", "plus", "B", "A+B"]  # 'start' has no models
    assert counts["lr"] == {0.1: [2, 1, 1, 0], 0.2: [0, 1, 2, 3], 0.5: [0, 0, 1, 1]}
    assert list(counts)[0] == "lr" and counts["num_layers"] == {2: [2, 2, 4, 4]}
    labels, table = report.clone_by_depth(h, 2)
    assert table.shape == (4, 2)
    np.testing.assert_allclose(table[-1], [(0.1 + 3 * 0.2) / 4, (0.3 + 3 * 0.2) / 4])  # others: their global μ
    np.testing.assert_allclose(table[0], [0.2, 0.2])
    vals = report.mu_values(h[-1]["retained"])
    assert list(vals) == ["hp:lr", "clone:encoderblock_0", "clone:encoderblock_1"]
    assert sorted(vals["hp:lr"]) == [0.04, 0.2, 0.2, 0.2]
    assert report.mu_values(h[1]["retained"]) == {"mu": [0.2, 0.2]}  # μ2Net only: the global μ
    # clone_mean: embedding, cls, posembed and the model's 2 blocks
    assert report.clone_mean(h[-1]["retained"]["a1"]) == pytest.approx((3 * 0.2 + 0.1 + 0.3) / 5)


def _fig3(label: str, acc: float, params: float, flops: float, other: float | None = None) -> dict:
    test = {"a": acc} | ({"b": other} if other is not None else {})
    return {"segment": label, "test_acc_set": acc, "params": params, "flops": flops, "test": test,
            "report_set": ["a"]}


def test_aggregate_mean_and_sample_std():
    runs = [[_fig3("start", math.nan, math.nan, math.nan), _fig3("s1", a, p, f, o)]
            for a, p, f, o in [(0.8, 10.0, 1e5, 0.5), (0.9, 20.0, 1e5, 0.7), (1.0, 30.0, 1e5, 0.9)]]
    start, s1 = report.aggregate(runs)
    assert s1["n"] == 3 and s1["segment"] == "s1"
    assert s1["test_acc_set"] == pytest.approx((0.9, 0.1))  # ddof = 1: sqrt(0.02 / 2)
    assert s1["params"] == pytest.approx((20.0, 10.0))
    assert s1["flops"] == (1e5, 0.0)
    assert s1["test_acc_other"] == pytest.approx((0.7, 0.2))
    assert math.isnan(start["test_acc_set"][0])
    text = report.aggregate_table([start, s1])
    assert "| s1 | 3 | 90.00 ± 10.00 | 70.00 ± 20.00 | 20 ± 10 | 1e+05 ± 0 |" in text
    assert "| start | 3 | – | – | – | – |" in text
    (one,) = report.aggregate([runs[0][1:]])
    assert math.isnan(one["params"][1]) and "| s1 | 1 | 80.00 | 50.00 | 10 | 1e+05 |" in report.aggregate_table([one])
    with pytest.raises(report.ReportError, match=r"run 1: segments \['start'\] differ"):
        report.aggregate([runs[0], runs[1][:1]])


def test_aggregate_plot_written(tmp_path):
    runs = [[_fig3("s1", a, 10.0 * a, 1e5)] for a in (0.5, 0.6)]
    report.plot_aggregate(report.aggregate(runs), tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 5000


def test_figure2_narrow_log_axis_has_a_few_plain_tick_labels():
    """Arms of a paired comparison span less than a decade of FLOPs: matplotlib's log axis would label every minor
    tick there, one over the other."""
    plt = report._plt()
    fig, (a, b) = plt.subplots(1, 2)
    for ax in (a, b):
        ax.plot([1.38e6, 1.413e6], [0.0, 1.0])
    a.set_xscale("log")
    report._log_x(b)
    fig.canvas.draw()

    def labels(ax, minor):  # the labels drawn: inside the axis, not empty
        lo, hi = ax.get_xlim()
        return [t.get_text() for t in ax.get_xticklabels(minor=minor)
                if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert len(labels(a, True)) > 5  # what the plain log axis does
    assert labels(b, True) == [] and 2 <= len(labels(b, False)) <= 5
    plt.close(fig)
