"""Device memory of one child's training, for the paper's configurations, from XLA's memory analysis of the
programs a child runs, compiled for abstract inputs (nothing is allocated).

    python bench/memory.py --check          # first: the analysis against the peak measured here (Ti/16, 224 px)
    python bench/memory.py                  # the paper's configurations (Sections 4 and 5), each setting
    python bench/memory.py --manifests      # every (method family, largest resolution) of the paper manifests
    python bench/memory.py --cases tiny:16:8 --settings plain,remat   # a case is VIT:RES:BATCH[:DEPTH]

A child runs three programs (train.programs): a chunk's preprocessing, the chunk of SGD steps (the fused
lax.scan of train._chunk, trainable split "mask": every component differentiated) and validation (train._hits,
eval_batch images). A program's peak is its arguments + outputs − aliased + temporaries (XLA's buffer assignment:
`compiled.memory_analysis()`); beside it the device holds what the training loop keeps between calls: the
validation set (validation_max images of S × S × 3 bytes, put once per child), the uint8 chunk and one snapshot of
the trainable half and its momentum (the best cycle, Algorithm 1 line 29). The child's peak is the largest
program's peak plus these. The analysis is XLA:CPU's (the machine this runs on); XLA:GPU/TPU fuse differently, so
the figures are this compiler's buffer assignment of the same program, not a TPU's.

Settings (train.ChildBudget): plain (remat = false, micro_batches = 1), remat (per encoder block), and `fit`: remat
with the fewest micro-batches (a power of two) that brings the child under `--fit` GiB: when remat alone does not,
a row for each count tried (2, 4, ...).
"""
import argparse
import dataclasses
import functools
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
import manifest  # noqa: E402
import methods  # noqa: E402
import schedule  # noqa: E402
import train  # noqa: E402
import vit  # noqa: E402
from bench.realsize import Phase, nbytes  # noqa: E402

GiB = 1 << 30
DEVICES = (16, 32, 80)  # GiB: TPUv3 core (Section 4), TPUv4 chip (Section 5), an 80 GiB GPU


@dataclasses.dataclass(frozen=True)
class Case:
    """One child's shape: the root (vit, depth), its resolution and batch, the image size S the data is kept at,
    the padded head, validation batch and set size."""

    name: str
    vit: str
    res: int
    batch: int
    depth: int = 0  # 0: every block
    size: int = 0  # S; 0: = res
    classes: int = 1000
    eval_batch: int = 256
    validation: int = 10_000
    samples_cap: int = 51_200

    @property
    def cfg(self) -> vit.Config:
        c = vit.CONFIGS[self.vit]
        return dataclasses.replace(c, depth=self.depth or c.depth)

    @property
    def S(self) -> int:
        return self.size or self.res


# Section 5: L/16 at Table 1's two resolutions, batch 64, validation on ≤ 10,000 images, data kept at 384 px.
# Section 4 (docs/benchmarks.md §2, §6): MCCB's Ti/16 cut to 3 blocks at 32 px (root) and 112 px (μ2Net+'s largest),
# batch 512; VDDB's B/16 at 80 px (root) and 112 px with μ2Net+'s batch 128, and at 80 px with muNet's 256.
PAPER = (
    Case("Sec 5 L/16", "L/16", 224, 64, size=384),
    Case("Sec 5 L/16", "L/16", 384, 64, size=384),
    Case("Sec 4 MCCB Ti/16×3", "Ti/16", 32, 512, depth=3, size=112, classes=16, validation=5120),
    Case("Sec 4 MCCB Ti/16×3", "Ti/16", 112, 512, depth=3, size=112, classes=16, validation=5120),
    Case("Sec 4 VDDB B/16", "B/16", 80, 128, size=112, validation=5120),
    Case("Sec 4 VDDB B/16", "B/16", 112, 128, size=112, validation=5120),
    Case("Sec 4 VDDB B/16", "B/16", 80, 256, size=384, validation=2560),
)


@dataclasses.dataclass(frozen=True)
class Programs:
    """Memory of a child's three programs (bytes; a program's peak = args + outputs − alias + temps)."""

    analyses: dict[str, Any]  # "augment", "chunk", "hits" -> CompiledMemoryStats
    state: int  # trainable half + momentum
    resident: int  # validation set + uint8 chunk + one snapshot
    compile_s: float

    def peak(self, name: str) -> int:
        a = self.analyses[name]
        return a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes

    @property
    def child(self) -> int:
        return max(self.peak(n) for n in self.analyses) + self.resident


class _Task:
    """What train.programs reads of a task: its image size and validation set size."""

    def __init__(self, size: int, validation: int):
        self.image_size, self.num_validation = size, validation


def abstract_plan(case: Case) -> train.Plan:
    """A child of the root at full depth, every component trainable (the "mask" split), head padded; every array
    abstract (jax.ShapeDtypeStruct), so building and compiling it allocates nothing."""
    cfg, k = case.cfg, train.padded_classes(case.classes)
    shapes = jax.eval_shape(lambda: vit.init(cfg, jax.random.key(0), k, case.res))
    comps = tuple(shapes[n] for n in vit.path_order(list(shapes)))
    mom = tuple(train.zeros_like_bf16(c) for c in comps)
    diff, frozen, mom, mask = train.partition_trainable(comps, mom, (True,) * len(comps), "mask")
    hp = jax.tree.map(np.asarray, train.HParams.of(dict(methods.PLUS_DEFAULTS, resolution=case.res)))
    return train.Plan(None, diff, frozen, mom, np.asarray(mask), np.ones(len(comps), np.float32), hp,
                      np.asarray(jax.random.key_data(jax.random.key(0))), 0, case.res)


def budget(case: Case, remat: bool, micro: int) -> train.ChildBudget:
    return train.ChildBudget(batch_size=case.batch, samples_cap=case.samples_cap, eval_batch=case.eval_batch,
                        validation_max=case.validation, remat=remat, micro_batches=micro)


@functools.cache
def _programs() -> schedule.Programs:
    """One cache for the process: settings that differ only in the step share the preprocessing and validation
    programs; one worker, since a B/16 or L/16 compile takes GBs of its own."""
    return schedule.Programs(workers=1)


def compile_child(plan: train.Plan, case: Case, b: train.ChildBudget) -> list[Any]:
    """The child's three programs (compiled once per process: the compile s of a row count only new ones)."""
    return [_programs()(k, f) for k, f in train.programs([plan], _Task(case.S, case.validation), b, jax.devices()[0])]


def analyse(case: Case, remat: bool, micro: int) -> Programs:
    plan, b = abstract_plan(case), budget(case, remat, micro)
    t = time.perf_counter()
    pre, run, hits = compile_child(plan, case, b)
    state = nbytes((plan.diff, plan.mom))
    c = train.chunk_length(1, b, case.S, case.res)
    resident = case.validation * case.S ** 2 * 3 + c * case.batch * case.S ** 2 * 3 + state
    return Programs({"augment": pre.memory_analysis(), "chunk": run.memory_analysis(),
                     "hits": hits.memory_analysis()}, state, resident, time.perf_counter() - t)


def settings(case: Case, names: list[str], fit: float) -> list[tuple[str, bool, int]]:
    out = []
    for s in names:
        if s == "plain":
            out.append((s, False, 1))
        elif s == "remat":
            out.append((s, True, 1))
        elif m := re.fullmatch(r"remat\+mb(\d+)", s):
            out.append((s, True, int(m.group(1))))
        elif s != "fit":
            raise SystemExit(f"--settings: {s!r}: expected plain, remat, remat+mbN or fit")
    return out


def gib(b: float) -> str:
    return f"{b / GiB:.3g}"


def row(case: Case, name: str, p: Programs) -> str:
    ch, hi = p.analyses["chunk"], p.analyses["hits"]
    fits = " | ".join("yes" if p.child <= d * GiB else "no" for d in DEVICES)
    return (f"| {case.name} | {case.res} | {case.batch} | {name} | {gib(p.state)} | {gib(ch.temp_size_in_bytes)} | "
            f"{gib(p.peak('chunk'))} | {gib(p.peak('hits'))} | {gib(p.resident)} | {gib(p.child)} | {fits} | "
            f"{p.compile_s:.0f} |")


HEADER = ("| configuration | px | batch | setting | state | step temps | step peak | validation peak | resident | "
          "child peak | 16 GiB | 32 GiB | 80 GiB | compile s |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
          "---|---|---|---:|")


def table(cases: list[Case], names: list[str], fit: float) -> None:
    print(f"GiB; backend {jax.default_backend()}, jax {jax.__version__}; `fit`: remat and the fewest micro-batches "
          f"(a power of two) under {fit:g} GiB\n")
    print(HEADER, flush=True)
    for case in cases:
        for name, remat, micro in settings(case, names, fit):
            print(row(case, name, analyse(case, remat, micro)), flush=True)
        if "fit" in names:  # when remat alone does not fit: a row per micro-batch count tried
            micro, p = 1, analyse(case, True, 1)
            while p.child > fit * GiB and case.batch % (micro * 2) == 0:
                micro *= 2
                p = analyse(case, True, micro)
                print(row(case, f"remat, micro_batches = {micro}", p), flush=True)


MANIFESTS = ("manifests/paper_sec5.toml", "manifests/paper_sec4_mccb.toml", "manifests/paper_sec4_vddb.toml")


def manifest_cases(paths: tuple[str, ...] = MANIFESTS) -> list[Case]:
    """Per paper manifest and method family: a child at the largest resolution its search space reaches, with
    the family's batch, validation set and evaluation batch, the data kept at the run's image size S."""
    out: dict[tuple, Case] = {}
    for path in paths:
        m = manifest.load_manifest(path)
        for sub in manifest.runs(m):
            sm, cfg = sub.manifest, manifest.root_config(sub.manifest.root)
            S = manifest.image_size(sm)
            for seg in sm.segments:
                c = manifest.segment_config(sm, seg, sm.root.depth or cfg.depth)
                k = max(t.num_classes for t in data.resolve_tasks(manifest.segment_tasks(sm, seg), sm.catalog or None))
                fam = sub.family or seg.method
                case = Case(f"{m.name}: {fam}", sm.root.vit, max(c.resolutions()), seg.batch_size, sm.root.depth, S,
                            k, seg.eval_batch, seg.validation_max, seg.samples_cap)
                out.setdefault(dataclasses.astuple(case)[1:], case)
    return list(out.values())


# --- the analysis against a measured peak ---------------------------------------------------------------------


def check(case: Case, remat: bool, micro: int) -> tuple[int, int, int]:
    """Runs the chunk program once on real (random) arguments and returns (predicted outputs + temps, measured
    peak RSS growth during the call, the program's temps): the arguments are allocated before the peak is reset
    (/proc/self/clear_refs), so what the call adds is its outputs and temporaries."""
    plan, b = abstract_plan(case), budget(case, remat, micro)
    pre, run, hits = compile_child(plan, case, b)
    c = train.chunk_length(1, b, case.S, case.res)
    key = iter(jax.random.split(jax.random.key(1), 10_000))
    real = lambda s: jax.random.normal(next(key), s.shape, s.dtype) * 0.02  # noqa: E731
    q = jax.tree.map(lambda a: real(a)[None], (plan.diff, plan.mom))
    x = jax.random.uniform(next(key), (1, c, case.batch, case.res, case.res, 3), jnp.float32, -1, 1)
    y = jnp.zeros((1, c, case.batch), jnp.int32)
    fixed = jax.tree.map(lambda a: jnp.asarray(a)[None], (plan.mask, plan.on, plan.frozen, plan.hp))
    args = (*q, *fixed, x, y, jnp.int32(0), jnp.int32(c), jnp.int32(c), jnp.int32(10))
    jax.block_until_ready(args)
    a = run.memory_analysis()
    with Phase() as p:
        jax.block_until_ready(run(*args))
    return a.output_size_in_bytes + a.temp_size_in_bytes, p.peak - p.start, a.temp_size_in_bytes


def parse_case(s: str, validation: int = 0) -> Case:
    """VIT:RES:BATCH[:DEPTH]: validation (default: one batch) in batches of at most 256, one step per chunk."""
    m = re.fullmatch(r"([^:]+):(\d+):(\d+)(?::(\d+))?", s)
    if not m or m.group(1) not in vit.CONFIGS:
        raise SystemExit(f"--cases: {s!r}: expected VIT:RES:BATCH[:DEPTH] with VIT one of {sorted(vit.CONFIGS)}")
    b = int(m.group(3))
    return Case(s, m.group(1), int(m.group(2)), b, int(m.group(4) or 0), validation=validation or b, samples_cap=b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma-separated VIT:RES:BATCH[:DEPTH] (default: the paper's)")
    ap.add_argument("--manifests", default=None, nargs="?", const="", metavar="MATCH",
                    help="the cases every paper manifest family reaches (those whose name contains MATCH)")
    ap.add_argument("--settings", default="plain,remat,fit")
    ap.add_argument("--fit", type=float, default=32.0, help="GiB the `fit` setting must stay under")
    ap.add_argument("--check", default="", help="VIT:RES:BATCH[:DEPTH] to run: the analysis against the peak RSS "
                    "(then the table of --cases, if given, from the same compiled programs)")
    ap.add_argument("--validation", type=int, default=0, help="validation images of --cases (default: a batch)")
    a = ap.parse_args(argv)
    if a.check:
        case = parse_case(a.check)
        print("| case | setting | predicted outputs + temps | measured peak RSS growth | ratio |\n"
              "|---|---|---:|---:|---:|")
        for name, remat, micro in settings(case, a.settings.split(","), a.fit):
            pred, got, _ = check(case, remat, micro)
            print(f"| {case.name} | {name} | {gib(pred)} | {gib(got)} | {got / pred:.3f} |", flush=True)
        if not a.cases:
            return
        print()
    cases = ([parse_case(s, a.validation) for s in a.cases.split(",")] if a.cases else
             [c for c in manifest_cases() if a.manifests in c.name] if a.manifests is not None else list(PAPER))
    table(cases, a.settings.split(","), a.fit)


if __name__ == "__main__":
    main()
