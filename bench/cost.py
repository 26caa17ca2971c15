"""What a manifest costs, from its budgets and the analytic FLOP count (score.flops), before running it.

    python bench/cost.py [--manifest manifests/paper_sec5.toml --chips 16 --peak 275e12 --mfu 0.4]

Per task iteration (Algorithm 1): #generations × #children children; a child trains #cycles cycles of
min(1 epoch, samples cap) / batch size steps and is validated after each cycle (≤ 10,000 images, data.VAL_MAX).
An upper bound takes every task at the samples cap (the VTAB-1k tasks, whose 800 training images give 50 steps a
cycle, are counted apart). A training image costs 3 forward passes (forward, and a backward of twice its cost: the
"mask" split differentiates every component). Chip time = FLOPs / (peak × utilisation); the defaults are a TPU v4
chip (275 TFLOP/s bf16) at 40 %. A v4-32 slice is 16 chips (32 TensorCores, JAX shows one device per chip), 4 hosts.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import manifest  # noqa: E402
import score  # noqa: E402
import vit  # noqa: E402

VTAB_1K_TRAIN = 800


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="manifests/paper_sec5.toml")
    ap.add_argument("--chips", type=int, default=16, help="chips of the slice (v4-32: 16)")
    ap.add_argument("--peak", type=float, default=275e12, help="peak FLOP/s of one chip")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak reached")
    a = ap.parse_args()
    m = manifest.load_manifest(a.manifest)
    cfg = vit.CONFIGS[m.root.vit]
    rate = a.peak * a.mfu
    total_flops, total_children, total_iters, total_wall = 0.0, 0, 0, 0.0
    print(f"{m.name}: ViT {m.root.vit}, chip {a.peak:.3g} FLOP/s × {a.mfu:.0%}, {a.chips} chips\n")
    print("| segment | iterations × tasks (1k) | children / it | steps / child | images / child | "
          "FLOPs / it at 384 px | chip-h / it | wall h / it |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for seg in m.segments:
        names = manifest.segment_tasks(m, seg)
        k1 = sum(n.endswith("/1k") for n in names)
        children = seg.generations * seg.children
        steps = seg.cycles * (seg.samples_cap // seg.batch_size)
        steps_1k = seg.cycles * (VTAB_1K_TRAIN // seg.batch_size)
        fwd = {r: score.flops(cfg, cfg.depth, r, 1000) for r in (224, 384)}
        val = seg.cycles * data.VAL_MAX  # validation images per child (at most)
        per_child = steps * seg.batch_size * 3 * fwd[384] + val * fwd[384]
        per_child_1k = steps_1k * seg.batch_size * 3 * fwd[384] + seg.cycles * 200 * fwd[384]
        it_flops = children * per_child
        # One generation runs its children side by side, one per chip: its wall time is one child's.
        rounds = -(-seg.children // a.chips)
        wall = seg.generations * rounds * per_child / rate / 3600
        iters = seg.iterations * len(names)
        total_iters += iters
        total_children += iters * children
        total_flops += seg.iterations * ((len(names) - k1) * it_flops + k1 * children * per_child_1k)
        total_wall += seg.iterations * ((len(names) - k1) * wall + k1 * wall * per_child_1k / per_child)
        print(f"| {seg.name} | {seg.iterations} × {len(names)} ({k1}) | {children} | {steps:,} ({steps_1k} 1k) | "
              f"{steps * seg.batch_size:,} | {it_flops:.2e} | {it_flops / rate / 3600:.1f} | {wall:.1f} |")
    print(f"\nwhole manifest, every non-1k task at the samples cap: {total_iters} task iterations, "
          f"{total_children:,} children, {total_flops:.2e} FLOPs = {total_flops / rate / 3600:,.0f} chip-hours "
          f"({total_flops / rate / 3600 / a.chips:,.0f} h on {a.chips} chips if every chip were busy; "
          f"{total_wall:,.0f} h with one child per chip and #children per generation)")
    print(f"forward FLOPs per image: {fwd[224]:.3e} at 224 px, {fwd[384]:.3e} at 384 px")


if __name__ == "__main__":
    main()
