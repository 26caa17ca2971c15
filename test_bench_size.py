"""bench/memory.py and bench/realsize.py at tiny size: they run, and what they print follows from what they measure."""

import re

import jax

import train
from bench import memory, realsize


def test_memory_analysis_of_a_child(capsys):
    memory.main(["--cases", "tiny:32:64:1", "--settings", "plain,remat,remat+mb4"])
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines() if r.startswith("| tiny")]
    temps = {r[3].strip(): float(r[5]) for r in rows}
    # Remat keeps a block's input instead of its activations; micro-batches keep a quarter of them.
    assert set(temps) == {"plain", "remat", "remat+mb4"}
    assert temps["remat+mb4"] < temps["remat"] < temps["plain"]
    assert all([c.strip() for c in r[-4:-1]] == ["yes"] * 3 for r in rows)  # a tiny child fits every device
    case = memory.parse_case("tiny:32:64:1")
    predicted, measured, temp = memory.check(case, False, 1)
    assert temp > 0 and predicted >= temp and measured > 0


def test_memory_cases_of_the_paper_manifests():
    cases = {(c.vit, c.depth, c.res, c.batch, c.size) for c in memory.manifest_cases()}
    assert ("L/16", 0, 384, 64, 384) in cases  # Section 5: L/16 at 384 px, batch 64
    assert ("Ti/16", 3, 112, 512, 112) in cases  # MCCB μ2Net+: the small space's largest image size
    assert ("B/16", 0, 384, 256, 384) in cases  # VDDB muNet: its 24 sizes reach 384 px, batch 256


def test_realsize_before_and_after(capsys):
    args = ["--vit", "tiny", "--file-res", "8", "--res", "16", "--batch", "2", "--steps", "2", "--val", "3",
            "--peak-n", "128"]
    after = realsize.main(args)
    before = realsize.main(args + ["--before"])
    out = capsys.readouterr().out
    assert re.search(r"matmul peak \(float32, 128²\): [\d.]+ GFLOP/s", out)
    for r in (after, before):
        assert r.images_s > 0 and r.flops_s > 0 and r.rss_train > 0 and r.compile_s > 0
    # The validation program: 3 images in a batch of 4 now, padded to eval_batch 256 before.
    batches = {k[4] for k in train._programs if k[0] == "hits" and k[6] == 16 and k[-1] == jax.devices()[0]}
    assert {4, 256} <= batches
    assert after.model["activations"] < before.model["activations"]  # remat
