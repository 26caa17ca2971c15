"""Section 4 comparisons: Pareto frontiers, Table 2's aggregation, and a tiny comparison run end to end, resumed."""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest

import evolve
import manifest
import report

TINY = """
name = "cmp"
seed = 0
report_set = ["digits"]

[root]
kind = "random"
vit = "tiny"
resolutions = [8, 16]
resolution = 16
hp = { lr = 0.05 }

[[segments]]
name = "one"
method = "mu2net+"
tasks = ["digits"]
generations = 1
children = 1
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
P = 2e4
F = 2e6

[comparison]
repetitions = 2

[[comparison.families]]
name = "mu2net+"
vary = "s"
values = [0.5, 1.0]

[[comparison.families]]
name = "fine-tune top layers"
vary = "clone"
values = ["all", "top:1"]
set = { method = "finetune" }
"""


def test_pareto_frontier():
    pts = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.65), (4.0, 0.9), (0.5, 0.4), (4.0, 0.9)]
    # (2, 0.6) and (3, 0.65) are dominated by (2, 0.7); equal points both stay.
    assert report.pareto(pts) == [5, 0, 1, 4, 6]
    assert report.pareto([(1.0, 1.0)]) == [0]


def test_aggregate_max_mean_sample_std():
    def run(fam, cfg, rep, accs, params, flops):
        return dict(family=fam, config=cfg, value=None, repetition=rep, test=dict(enumerate(accs)), params=params,
                    flops=flops)

    runs = [run("a", "s=1", 0, [0.8, 0.6], 10.0, 100.0), run("a", "s=1", 1, [0.9, 0.9], 20.0, 300.0),
            run("a", "s=1", 2, [0.9, 0.7], 30.0, 200.0), run("a", "s=0.5", 0, [0.5, 0.5], 1.0, 1.0),
            run("b", "k=0", 0, [0.4, 0.6], 5.0, 50.0)]
    rows = {(r["family"], r["config"]): r for r in report.compare_rows(runs)}
    r = rows["a", "s=1"]
    assert r["n"] == 3 and math.isclose(r["mean"], 0.8) and math.isclose(r["max"], 0.9)
    assert math.isclose(r["std"], 0.1)  # sample std of 0.7, 0.9, 0.8 (ddof = 1)
    assert math.isclose(r["se"], 0.1 / math.sqrt(3))  # its standard error
    assert math.isclose(r["params"], 20.0) and math.isclose(r["flops"], 200.0)
    assert math.isclose(r["params_se"], 10.0 / math.sqrt(3)) and math.isclose(r["flops_se"], 100.0 / math.sqrt(3))
    assert math.isnan(rows["b", "k=0"]["std"]) and math.isnan(rows["b", "k=0"]["se"])  # one repetition
    text = report.table2(list(rows.values()))
    best = text.split("## Every configuration")[0]
    assert "| a (s=1) | 90.00 | 80.00 ± 5.77 | 10.00 | 3 |" in best and "a (s=0.5)" not in best
    assert "| b (k=0) | 50.00 | 50.00 ± – | – | 1 |" in best


def test_tables_share_runs(tmp_path):
    """A family drawn in two tables (e.g. μ2Net+ beside equal and beside per-family preprocessing defaults) shares
    its runs; each table gets its Table 2, every configuration and a Figure 2; runs of an older comparison.json
    (no tables) go to the first."""
    def sub(fam, cfg, rep, acc, tables=None):
        d = tmp_path / fam / cfg / f"rep{rep}"
        d.mkdir(parents=True)
        info = dict(family=fam, config=cfg, value=None, repetition=rep) | ({"tables": tables} if tables else {})
        (d / "comparison.json").write_text(json.dumps(info))
        (d / "result.json").write_text(json.dumps(dict(test={"t": acc}, params=10.0 * (rep + 1), flops=5.0)))

    for rep in (0, 1):
        sub("a", "s=1", rep, 0.9 - 0.1 * rep, ["", "paper defaults"])
        sub("b", "k=0", rep, 0.6)
        sub("b, paper defaults", "k=0", rep, 0.4 + 0.2 * rep, ["paper defaults"])
    rows = report.write_comparison(tmp_path)
    assert {(r["family"], tuple(r["tables"])) for r in rows} == {
        ("a", ("", "paper defaults")), ("b", ("",)), ("b, paper defaults", ("paper defaults",))}
    text = (tmp_path / "comparison.md").read_text()
    first, second = text.split("## Table 2: paper defaults")
    assert "## Table 2\n" in first and "| a (s=1) | 90.00 | 85.00 ± 5.00 | 7.07 | 2 | 15 | 5 |" in first
    assert "| b (k=0) |" in first and "paper defaults (k=0)" not in first
    assert "| a (s=1) |" in second and "| b, paper defaults (k=0) | 60.00 | 50.00 ± 10.00 |" in second
    assert "| b (k=0) |" not in second and "standard error" in text
    assert (tmp_path / "figure2.png").stat().st_size > 10_000
    assert (tmp_path / "figure2-paper-defaults.png").stat().st_size > 10_000


def test_bad_comparison_names_the_field(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(TINY.replace('vary = "clone"', 'vary = "clones"'))
    with pytest.raises(evolve.ManifestError, match=r"comparison.families\[1\].vary = 'clones'"):
        evolve.load_manifest(p)
    p.write_text(TINY.replace('values = ["all", "top:1"]', 'values = ["all", "top:x"]'))
    with pytest.raises(evolve.ManifestError, match=r"fine-tune top layers, clone=top:x.*clone = 'top:x'"):
        evolve.load_manifest(p)


def test_tiny_comparison_end_to_end_and_resumed(tmp_path, capsys):
    p = tmp_path / "m.toml"
    p.write_text(textwrap.dedent(TINY))
    out = tmp_path / "cmp"
    m = evolve.load_manifest(p)
    subs = evolve.runs(m)
    # repetition by repetition: a sweep stopped early has every configuration at the same number of repetitions
    assert [s.path for s in subs] == [f"{f}/{c}/rep{r}" for r in (0, 1) for f, cs in (
        ("mu2net+", ("s=0.5", "s=1")), ("fine-tune top layers", ("clone=all", "clone=top:1"))) for c in cs]
    assert subs[4].manifest.seed == 1 and subs[2].manifest.segments[0].method == "finetune"
    # Interrupted between sub-runs: the first two finished, then the process died.
    args = ["--manifest", str(p), "--out", str(out), "--compile-cache", ""]
    for i in (0, 1):
        assert evolve.main(args + ["--sweep-index", str(i)]) == 0
    done = {s.path: (out / s.path / "COMMIT").read_bytes() for s in subs[:2]}
    capsys.readouterr()
    assert evolve.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("finished before, skipped") == 2
    assert all((out / k / "COMMIT").read_bytes() == v for k, v in done.items())  # never redone
    rows = report.compare_rows(report.sub_runs([out]))
    assert sorted((r["family"], r["config"], r["n"]) for r in rows) == [
        ("fine-tune top layers", "clone=all", 2), ("fine-tune top layers", "clone=top:1", 2),
        ("mu2net+", "s=0.5", 2), ("mu2net+", "s=1", 2)]
    assert all(0 < r["mean"] <= 1 and r["params"] > 0 and r["flops"] > 0 for r in rows)
    assert (out / "comparison.md").exists() and (out / "figure2.png").stat().st_size > 10_000
    assert "## Table 2" in (out / "comparison.md").read_text()
    info = json.loads((out / subs[6].path / "comparison.json").read_text())
    assert info == dict(family="fine-tune top layers", config="clone=all", value="all", repetition=1, tables=[""])


def test_offline_miniature_manifest():
    """sec4_mini.toml: ≥ 6 tasks from ≥ 3 sources, five families × 3 configurations × 3 repetitions, and equal
    training epochs per task across the evolutionary methods (the baselines: one copy of a generation's two)."""
    import data

    m = evolve.load_manifest("manifests/sec4_mini.toml")
    subs = evolve.runs(m)
    assert len({s.family for s in subs}) == 5 and len(subs) == 5 * 3 * 3
    tasks = evolve.segment_tasks(m, m.segments[0])
    cat = data.load_catalog()
    assert len(tasks) >= 6 and len({cat[t].source for t in tasks}) >= 3
    assert m.root.pretrain.task not in tasks
    for s in subs:
        (seg,) = s.manifest.segments
        epochs = seg.iterations * seg.generations * seg.children * seg.cycles
        assert epochs == (16 if seg.method in ("mu2net+small", "munet") else 8), s.path


def test_second_miniature_manifest():
    """sec4_mini2.toml: children per task in Section 4's proportions (μ2Net+ 160 : muNet 128, ≥ 32 for μ2Net+, one
    per baseline configuration), equal epochs per task (the baselines: one copy of a generation's two), muNet's seed
    probes ≤ 20 % of its children, ≥ 3 repetitions, and a second table in which muNet and the baselines keep the
    paper's preprocessing defaults."""
    m = evolve.load_manifest("manifests/sec4_mini2.toml")
    subs = evolve.runs(m)
    ntasks = len(evolve.segment_tasks(m, m.segments[0]))
    assert m.comparison.repetitions >= 3 and {s.repetition for s in subs[:len(subs) // 3]} == {0}
    children, epochs = {}, set()
    for s in subs:
        (seg,) = s.manifest.segments
        children[seg.method] = seg.iterations * seg.generations * seg.children
        copies = m.segments[0].children if seg.method in ("finetune", "adapters") else 1
        epochs.add(children[seg.method] * seg.cycles * copies)
        paper = s.tables == ("paper defaults",)
        off = seg.defaults == dict(crop_area_min=1.0, crop_aspect_min=1.0, flip=False)
        assert off != paper and ("" in s.tables or paper), s.path
    assert len(epochs) == 1 and children["mu2net+small"] >= 32
    assert children["mu2net+small"] * 128 == children["munet"] * 160 and children["finetune"] == 1
    # muNet's seeds (docs/benchmarks.md §5.2): in its first task iteration the root and every earlier task's model,
    # in the later ones the root and every other task's model
    munet = next(s.manifest.segments[0] for s in subs if s.family == "munet")
    probes = ntasks * (ntasks + 1) // 2 + (munet.iterations - 1) * ntasks * ntasks
    assert probes <= 0.2 * ntasks * children["munet"]


# A paired control (comparison.shared): one shared μ2Net segment per repetition, then two arms continuing it.
PAIRED = """
name = "paired"
seed = 0
report_set = ["digits"]

[root]
kind = "random"
vit = "tiny"
resolutions = [16]
resolution = 16
hp = { lr = 0.05 }

[[segments]]
name = "one"
method = "mu2net"
tasks = ["digits"]
iterations = 3
until_gain = 1e9
generations = 1
children = 2
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128

[[segments]]
name = "two"
method = "mu2net+"
tasks = ["digits"]
generations = 1
children = 2
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
P_factor = 10
F_factor = 10
penalty_segment = 1

[comparison]
repetitions = 2
shared = 1
pairs = [["control", "plus"]]

[[comparison.families]]
name = "plus"

[[comparison.families]]
name = "control"
set = { method = "mu2net", P_factor = 0.0, F_factor = 0.0, penalty_segment = -1 }
"""


def test_paired_differences_per_repetition_mean_and_standard_error():
    def run(fam, rep, acc, params, flops):
        return dict(family=fam, config="default", repetition=rep, test_acc_set=acc, params=params, flops=flops)

    runs = [run("b", 0, 0.90, 100.0, 10.0), run("a", 0, 0.91, 80.0, 10.0), run("b", 1, 0.80, 200.0, 20.0),
            run("a", 1, 0.80, 180.0, 19.0), run("b", 2, 0.70, 50.0, 5.0)]  # a's repetition 2 has not finished
    (p,) = report.paired(runs, [("b", "a")])
    assert p["n"] == 2 and [r["repetition"] for r in p["rows"]] == [0, 1]
    assert p["rows"][0]["params"] == (100.0, 80.0, pytest.approx(-20.0))
    assert p["rows"][1]["flops"][2] == pytest.approx(-5.0)
    assert p["test_acc_set"][2] == pytest.approx(0.5)  # +1 and 0 points
    # params: -20 % and -10 %, sample std 7.07 over √2; the mean levels are 150 → 130.
    assert p["params"] == (150.0, 130.0, pytest.approx(-15.0), pytest.approx(5.0))
    text = report.paired_table([p])
    assert "## b → a" in text and "| test acc % on the report set: b → a |" in text
    assert ("| mean ± SE (n = 2) | 85.00 → 85.50 | +0.50 ± 0.50 | 150 → 130 | -15.00 ± 5.00 "
            "| 15 → 14.5 | -2.50 ± 2.50 |") in text


def test_arms_continue_one_shared_commit_with_the_same_keys(tmp_path, capsys):
    """comparison.shared = 1: per repetition the first segment runs once (shared/rep<r>), stopped on convergence
    (until_gain), then each family's sub-run continues that commit at segment index 1, so its keys are those of one
    uninterrupted run: the arm equals, bit for bit, the whole sequence run straight. paired.md pairs the arms by
    repetition."""
    import checkpoint
    import mu2net

    p = tmp_path / "m.toml"
    p.write_text(PAIRED)
    out = tmp_path / "cmp"
    m = evolve.load_manifest(p)
    subs = evolve.runs(m, out=str(out))
    assert [s.path for s in subs] == [f"{x}/rep{r}" for r in (0, 1) for x in ("shared", "plus/default",
                                                                             "control/default")]
    arm = subs[1].manifest
    assert (arm.root.kind, arm.root.path, arm.first_segment) == ("system", f"{out}/shared/rep0", 1)
    assert (arm.root.vit, arm.root.resolutions) == ("tiny", (16,)) and not arm.root.pretrain.task
    assert [s.name for s in arm.segments] == ["two"] and arm.segments[0].penalty_segment == 0
    assert [s.name for s in subs[0].manifest.segments] == ["one"] and subs[3].manifest.seed == 1
    keys = {evolve.key_data(evolve.task_key(s.manifest, (0, 0, 0)))
            == evolve.key_data(manifest.iteration_key(r, 1, 0, 0)) for r, s in ((0, subs[1]), (0, subs[2]), (1, subs[4]), (1, subs[5]))}
    assert keys == {True}
    # One repetition end to end (the plan of two is checked above).
    args = ["--manifest", str(p), "--out", str(out), "--compile-cache", "", "--set", "comparison.repetitions=1"]
    # An arm whose shared run has not finished is refused in one line, before any work.
    assert evolve.main(args + ["--sweep-index", "1"]) == 2
    assert "continues" in capsys.readouterr().err and not (out / "plus").exists()
    assert evolve.main(args) == 0
    shared = checkpoint.load(out / "shared/rep0").extra["history"][-1]
    # until_gain: the first round gained less than 1e9 validation examples, so segment 1 stopped after 1 of 3.
    assert (shared["iterations"], shared["converged"]) == (1, True) and shared["gain"] < 1e9
    rounds = [e for e in map(json.loads, (out / "shared/rep0/metrics.jsonl").read_text().splitlines())
              if e.get("event") == "round"]
    assert [(e["iterations"], e["converged"]) for e in rounds] == [(1, True)]
    assert "| one | 1 |" in (out / "shared/rep0/report.md").read_text()
    for fam in ("plus", "control"):
        start = checkpoint.load(out / f"{fam}/default/rep0").extra["history"][0]
        assert start["retained"] == shared["retained"]  # every arm starts from the shared run's system
    # The plus arm is the whole sequence run straight (its segment 2 with the same P, F and keys).
    straight = evolve.load_manifest(p, ["comparison.families=[]", "comparison.shared=0", "comparison.pairs=[]"])
    evolve.run(straight, tmp_path / "straight", stream=open(os.devnull, "w"))
    assert mu2net.identical(checkpoint.load(tmp_path / "straight").system,
                            checkpoint.load(out / "plus/default/rep0").system)
    res = {f: json.loads((out / f"{f}/default/rep0/result.json").read_text()) for f in ("plus", "control")}
    text = (out / "paired.md").read_text()
    change = 100 * (res["plus"]["params"] / res["control"]["params"] - 1)
    assert "## control → plus" in text and f"| {change:+.2f} |" in text and "mean ± SE (n = 1)" in text
    assert not (out / "shared/rep0/comparison.json").exists()  # a shared run is no family's: not in Table 2
    capsys.readouterr()
    assert evolve.main(args) == 0
    assert capsys.readouterr().err.count("finished before, skipped") == 3
