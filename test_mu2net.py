"""The system and one task iteration (Algorithm 1) on tiny ViTs and scikit-learn digits, CPU only."""

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods
import mu2net
import schedule
import score
import train
import vit
import conftest
import data
from bench.compiles import Compiles

CFG = vit.CONFIGS["tiny"]


def conf(method: methods.Method = methods.Method(), **kw) -> methods.Config:
    space = methods.search_space(CFG.depth, (8, 16), resolution=16)
    space = dataclasses.replace(space, defaults={**space.defaults, "lr": 0.1})  # a random-init root learns faster
    budget = dict(generations=2, children=2, cycles=2, samples_cap=512, batch_size=32, P=2e4, F=2e6)
    return methods.Config(space, method, methods.Budget(**budget | kw))


@pytest.fixture(scope="module")
def tasks():
    """scikit-learn digits at 16 px and its parity, VTAB-style: two tasks from one dataset (catalog.toml)."""
    catalog = data.load_catalog()
    return [data.make_task_data(catalog[name], 16) for name in ("digits", "digits/parity")]


@pytest.fixture(scope="module")
def s0():
    space = conf().space
    return mu2net.new_system(CFG, vit.init(CFG, jax.random.key(0), 10, 16), space.defaults)


@pytest.fixture(scope="module")
def s1(s0, tasks):
    return conftest.task_iteration(s0, tasks[0], conf(), jax.random.key(1))


@pytest.fixture(scope="module")
def s2(s1, tasks):
    return conftest.task_iteration(s1, tasks[1], conf(), jax.random.key(2))


def train_child(pool, child, task, config, key):
    """One child, alone, as a task iteration trains it (schedule.child_job)."""
    job, back = schedule.child_job(pool, mu2net.Planned(0, child, -math.inf, key), task, config)
    plan = train.prepare(job, task, config.budget)
    return back(train.train_group([plan], task, config.budget, conftest.programs())[0])


def accuracy(system, model, task, split):
    """A retained model's accuracy as a task iteration measures it (laid out as validated)."""
    pool = mu2net.Pool(system, system.params, system.momentum, system.lineage)
    return conftest.trainer().accuracy(pool, model, task, split, 256)


def snapshot(system):
    return {c: [np.asarray(a).tobytes() for a in jax.tree.leaves(p)] for c, p in system.params.items()}


# --- a task iteration -------------------------------------------------------------------------------------


def test_same_key_same_system_and_input_untouched(s0, s1, tasks):
    before = snapshot(s0)
    again = conftest.task_iteration(s0, tasks[0], conf(), jax.random.key(1))
    assert mu2net.identical(again, s1)
    assert snapshot(s0) == before and s0.models == {} and s0.counter == len(s0.root.components)
    other = conftest.task_iteration(s0, tasks[0], conf(), jax.random.key(7))
    assert not mu2net.identical(other, s1)


def test_device_count_does_not_change_the_result(s0, s1, tasks):
    assert len(jax.local_devices()) >= 2, "conftest provides several fake CPU devices"
    one = conftest.task_iteration(s0, tasks[0], conf(), jax.random.key(1), devices=jax.local_devices()[:1])
    assert mu2net.identical(one, s1)


def test_vectorised_children_are_a_function_of_the_key_alone(s0, tasks):
    """Same-architecture children trained as one vectorised program (Budget.vectorise): the same key gives a
    bit-identical system, with both groups on one device or spread over two (groups never depend on devices)."""
    c = conf(generations=1, children=3, cycles=1, vectorise=2)  # key 4: a group of two alike, then one
    one = conftest.task_iteration(s0, tasks[0], c, jax.random.key(4), devices=jax.local_devices()[:1])
    two = conftest.task_iteration(s0, tasks[0], c, jax.random.key(4), devices=jax.local_devices()[:2])
    assert mu2net.identical(one, two) and "digits" in one.models
    assert schedule.groups(["a", "b", "a", "a", "a", "a", "a", "a"], 4) == [[0, 2, 3, 4], [1], [5, 6], [7]]


def test_learns_and_keeps_one_model_per_task(s1, s2, tasks):
    assert set(s2.models) == {"digits", "digits/parity"}
    m = s2.models["digits/parity"]
    assert m.task == "digits/parity" and m.metrics["test"] > 0.6  # chance is 0.5
    assert s1.models["digits"].metrics["test"] > 0.2  # chance is 0.1, after 2 x 2 short children
    head = s2.params[m.components[-1]]
    assert head.kernel.shape == (CFG.width, 2)
    # A retained model is assembled by id lookup and reproduces its recorded test accuracy.
    assert accuracy(s2, m, tasks[1], "test") == m.metrics["test"]
    acc = train.accuracy(mu2net.assemble(s2, m), tasks[1], "test", m.hp["resolution"], 256, conftest.programs())
    assert abs(acc - m.metrics["test"]) <= 1 / 270  # without the full-depth layout: one near-tie may flip
    # Garbage collection: only what the root or a retained model uses survives.
    assert set(s2.params) == s2.component_ids() == set(s2.momentum)


def test_no_forgetting(s1, s2, tasks):
    """A task iteration on t leaves every component another task uses bit-identical."""
    s3 = conftest.task_iteration(s2, tasks[0], conf(), jax.random.key(3))
    key = mu2net.selections_key("digits")  # the one thing that may change: how often it parented digits

    def rest(m):
        return dataclasses.replace(m, metrics={k: v for k, v in m.metrics.items() if k != key})

    assert rest(s3.models["digits/parity"]) == rest(s2.models["digits/parity"])
    for c in s2.models["digits/parity"].components:
        assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), s2.params[c], s3.params[c]))
    for c in s1.models["digits"].components:
        if c in s2.params:
            assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), s1.params[c], s2.params[c]))
    # ... and the active task's best score never decreases.
    c = conf()
    before = mu2net.model_score(s2, s2.models["digits"], c)
    after = mu2net.model_score(s3, s3.models["digits"], c)
    assert after >= before


def test_accounted_params_sum_to_distinct_params(s2):
    total = sum(mu2net.accounted_params(s2, m) for m in s2.models.values())
    used = {c for m in s2.models.values() for c in m.components}
    distinct = sum(score.param_count(s2.params[c]) for c in used)  # param_count is pinned in test_score.py
    assert math.isclose(total, distinct, rel_tol=1e-12)


def test_two_learning_rates_do_not_recompile(s1, tasks):
    pool = mu2net.Pool(s1, s1.params, s1.momentum, s1.lineage)
    c = conf(cycles=1)  # the chunk length of the other tests: their compiled programs
    parent = s1.models["digits"]
    child, _ = mu2net.make_child(pool, parent, "digits", 10, c, jax.random.key(5), s1.counter)
    train_child(pool, child, tasks[0], c, jax.random.key(6))
    conftest.programs().settle()  # programs compiled ahead for later generations, in the background
    for lr in (0.002, 0.05):
        hp = dict(child.model.hp, lr=lr, momentum=0.95, nesterov=True, brightness=0.1)
        other = dataclasses.replace(child, model=dataclasses.replace(child.model, hp=hp))
        with Compiles() as compiles:
            train_child(pool, other, tasks[0], c, jax.random.key(6))
        assert compiles.count == 0, compiles.names


# --- mutations and parent sampling against their definitions ---------------------------------------------


def test_neighbour_moves_one_step_clamped_at_the_ends():
    values = (1, 2, 3, 4)
    keys = jax.random.split(jax.random.key(0), 2000)
    at_end = collections.Counter(mu2net.neighbour(values, 1, train.Sampler(k)) for k in keys)
    assert set(at_end) == {1, 2} and abs(at_end[1] / 2000 - 0.5) < 0.05  # half the moves fall off the end
    mid = collections.Counter(mu2net.neighbour(values, 3, train.Sampler(k)) for k in keys)
    assert set(mid) == {2, 4} and abs(mid[2] / 2000 - 0.5) < 0.05
    top = collections.Counter(mu2net.neighbour(values, 4, train.Sampler(k)) for k in keys)
    assert set(top) == {3, 4}


def test_learned_mu_table():
    hp = {"mu": 0.2}
    fired, tables = 0, []
    for i in range(2000):
        mu = {}
        fired += mu2net.query("clone:cls", hp, mu, True, train.Sampler(jax.random.key(i)))
        tables.append(mu["clone:cls"])
    counts = collections.Counter(tables)
    # An unseen action starts at the model's μ and moves one step with probability μ (half of them clamped? no:
    # 0.2 is mid-list, so ±0.02 with probability 0.1 each).
    assert set(counts) == {0.18, 0.2, 0.22}
    assert abs(counts[0.2] / 2000 - 0.8) < 0.04 and abs(counts[0.18] / 2000 - 0.1) < 0.03
    assert abs(fired / 2000 - 0.2) < 0.03
    # Entries stay within the valid values at the ends.
    for i in range(200):
        mu = {"a": 0.3, "b": 0.02}
        mu2net.query("a", {"mu": 0.3}, mu, True, train.Sampler(jax.random.key(i)))
        mu2net.query("b", {"mu": 0.3}, mu, True, train.Sampler(jax.random.key(i)))
        assert mu["a"] in (0.28, 0.3) and mu["b"] in (0.02, 0.04)
    # μ2Net: one global μ, no table.
    mu = {}
    mu2net.query("clone:cls", hp, mu, False, train.Sampler(jax.random.key(0)))
    assert mu == {}


def _model(mid, task, comps, parent=None, **hp):
    return mu2net.Model(mid, task, tuple(comps), {**methods.PLUS_DEFAULTS, "resolution": 16, "num_layers": 2, **hp},
                        {}, parent, {})


def test_parent_sampling_probabilities():
    a1, a2 = _model("a1", "t", []), _model("a2", "t", [])
    o1, o2 = _model("o1", "u", []), _model("o2", "v", [])
    scores = {"a1": 0.9, "a2": 0.5}
    n = 3000
    picks = collections.Counter(
        mu2net.sample_parent([a2, a1], scores, [o1, o2], {"a1": 1, "a2": 2, "o1": 0}, k).id
        for k in jax.random.split(jax.random.key(0), n))
    # Best first: a1 accepted with 0.5^1; else a2 with 0.5^2; else the first other in random order (o1 or o2,
    # both unselected, so accepted at once).
    assert abs(picks["a1"] / n - 0.5) < 0.03
    assert abs(picks["a2"] / n - 0.5 * 0.25) < 0.02
    assert abs(picks["o1"] / n - 0.5 * 0.75 * 0.5) < 0.03 and abs(picks["o2"] / n - 0.5 * 0.75 * 0.5) < 0.03
    # Nothing accepted: uniform over all candidates.
    many = {m: 60 for m in ("a1", "a2", "o1", "o2")}
    picks = collections.Counter(mu2net.sample_parent([a1, a2], scores, [o1, o2], many, k).id
                                for k in jax.random.split(jax.random.key(1), 2000))
    assert all(abs(picks[m] / 2000 - 0.25) < 0.04 for m in many)


class Untrained:
    """A trainer that trains nothing and retains no child: only the sampling of parents runs."""

    def __call__(self, pool, todo, task_data, config, log, more=False):
        return {p.index: None for p in todo}

    def accuracy(self, pool, model, task_data, split, batch):
        return conftest.trainer().accuracy(pool, model, task_data, split, batch)


def test_selections_persist_across_task_iterations(s1, s2, tasks):
    """#selections(p, t) of Algorithm 1 line 9 continue across task iterations, kept on every model per task (the
    notebooks' `offsprings_per_task` / `offsprings`), for μ2Net, μ2Net+ and muNet alike."""
    digits, parity = (mu2net.selections_key(t.name) for t in tasks)
    # A real iteration: every child's parent is counted, on the root and on the retained models.
    assert s1.root.metrics[digits] >= 1
    assert sum(m.metrics.get(digits, 0) for m in (s1.root, *s1.models.values())) <= 2 * 2
    assert s2.root.metrics.get(digits) == s1.root.metrics[digits]  # another task's iteration leaves them be
    for name in ("mu2net", "mu2net+", "munet"):
        c = methods.config(name, CFG.depth, (8, 16), 16, generations=3, children=3, cycles=1, samples_cap=64,
                           batch_size=32)
        system, total = s2, collections.Counter({m.id: m.metrics.get(digits, 0) for m in (s2.root,
                                                                                           *s2.models.values())})
        for it in range(2):
            state = mu2net.start(system, "digits", c)
            assert state.selections == {k: v for k, v in total.items() if v}  # where the last iteration left them
            events = []
            for state in mu2net.generations(state, tasks[0], c, jax.random.key(10 + it), Untrained(), events.append):
                pass
            system = mu2net.finish(state, tasks[0], c, Untrained())
            total.update(e["parent"] for e in events if e["event"] == "child")
            for m in (system.root, *system.models.values()):
                assert m.metrics.get(digits, 0) == total[m.id], (name, it, m.id)
                assert m.metrics.get(parity) == next(p for p in (s2.root, *s2.models.values())
                                                     if p.id == m.id).metrics.get(parity)  # per task
        assert sum(total.values()) - sum(m.metrics.get(digits, 0) for m in (s2.root, *s2.models.values())) == 18


def _pool(s0):
    return mu2net.Pool(s0, s0.params, s0.momentum, s0.lineage)


def test_new_task_head_starts_at_zero_and_encoder_norm_is_cloned(s0):
    root = s0.root
    child, counter = mu2net.make_child(_pool(s0), root, "new", 7, conf(), jax.random.key(0), s0.counter)
    head = child.new[child.model.components[-1]][0]
    assert head.kernel.shape == (CFG.width, 7) and not np.any(head.kernel) and not np.any(head.bias)
    norm = child.model.components[-2]
    assert mu2net.kind(norm) == "encoder_norm" and norm not in root.components and child.trainable[-2]
    assert child.model.id == f"new/{s0.counter}" and counter > s0.counter  # make_child allocates its own ids


def test_clone_copies_parameters_and_momentum(s0):
    blk = next(c for c in s0.root.components if mu2net.kind(c) == "encoderblock_1")
    mom = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, jnp.bfloat16), s0.params[blk])
    s = dataclasses.replace(s0, momentum={**s0.momentum, blk: mom})
    c = conf(method=methods.Method(clone="all", hp_moves=False))
    child, _ = mu2net.make_child(_pool(s), s.root, "t", 10, c, jax.random.key(0), s.counter)
    assert all(child.trainable)
    new = child.model.components[s.root.components.index(blk)]
    assert new != blk and mu2net.kind(new) == "encoderblock_1"
    p, m = child.new[new]
    assert jax.tree.all(jax.tree.map(np.array_equal, p, s.params[blk]))
    assert jax.tree.all(jax.tree.map(np.array_equal, m, mom))


def test_removal_then_readding_restores_the_ancestor_block(s0):
    ids = s0.root.components
    top = next(c for c in ids if mu2net.kind(c) == "encoderblock_1")
    removed = _model("t/1", "t", [c for c in ids if c != top], parent=mu2net.ROOT, num_layers=1)
    pool = mu2net.Pool(s0, s0.params, s0.momentum, {**s0.lineage, "t/1": (mu2net.ROOT, removed.components)})
    assert mu2net.layers(pool, removed, 1) == [ids[3]]
    assert mu2net.layers(pool, removed, 2) == [ids[3], top]
    assert mu2net.layers(pool, s0.root, 0) == []
    # Through make_child with the num_layers move forced (μ table at 0.3, all other moves off).
    c = conf(method=methods.Method(clone="none"))
    c = dataclasses.replace(c, space=methods.SearchSpace({"num_layers": (0, 1, 2)}, c.space.defaults))
    grown = 0
    for i in range(40):
        removed_mu = dataclasses.replace(removed, mu={"hp:num_layers": 0.3})
        child, _ = mu2net.make_child(pool, removed_mu, "t", 10, c, jax.random.key(i), 100)
        if child.model.hp["num_layers"] == 2:
            grown += 1
            assert top in child.model.components  # the ancestor's (root's) block, shared frozen
    assert grown > 0


def test_resolution_change_resamples_the_root_position_embedding(s0):
    c = conf(method=methods.Method(clone="none"))
    c = dataclasses.replace(c, space=methods.SearchSpace({"resolution": (8, 16)}, c.space.defaults))
    for i in range(60):
        parent = dataclasses.replace(s0.root, mu={"hp:resolution": 0.3})
        child, _ = mu2net.make_child(_pool(s0), parent, "t", 10, c, jax.random.key(i), 100)
        if child.model.hp["resolution"] == 8:
            pe_id = child.model.components[2]
            pe = child.new[pe_id][0]
            root_pe = s0.params[s0.root.components[2]]
            assert pe.pos_embedding.shape == (1, 1 + 2 * 2, CFG.width)
            np.testing.assert_array_equal(pe.pos_embedding[0, 0], root_pe.pos_embedding[0, 0])
            np.testing.assert_allclose(pe.pos_embedding, vit.resample_posembed(root_pe, 8, 4).pos_embedding)
            return
    pytest.fail("resolution never moved")


def test_baselines_are_settings(s0):
    ids = s0.root.components
    top = conf(method=methods.Method(clone="top:1", hp_moves=False))
    child, _ = mu2net.make_child(_pool(s0), s0.root, "t", 10, top, jax.random.key(0), 100)
    names = [mu2net.kind(c) for c in child.model.components]
    trainable = dict(zip(names, child.trainable))
    assert not trainable["embedding"] and not trainable["encoderblock_0"]
    assert trainable["encoderblock_1"] and trainable["encoder_norm"] and trainable["head"]
    ad = conf(method=methods.Method(clone="none", adapter_dim=8, hp_moves=False))
    child, _ = mu2net.make_child(_pool(s0), s0.root, "t", 10, ad, jax.random.key(0), 100)
    names = [mu2net.kind(c) for c in child.model.components]
    assert names[3:7] == ["residual_adapter_0", "encoderblock_0", "residual_adapter_1", "encoderblock_1"]
    assert [t for n, t in zip(names, child.trainable) if n.startswith("encoderblock")] == [False, False]
    # Adapters, the forced encoder_norm and the head train (docs/benchmarks.md §7.2; §7.3's sizes count it per task).
    assert dict(zip(names, child.trainable))["encoder_norm"]
    assert all(t for n, t in zip(names, child.trainable) if n.startswith("residual_adapter"))
    assert child.model.components[4] == ids[3]


def test_method_search_spaces():
    plus, mu2, mun = (methods.search_space(2, (8, 16), method=m) for m in ("plus", "mu2net", "munet"))
    assert plus.values["num_layers"] == (0, 1, 2) and plus.values["resolution"] == (8, 16) and "mu" not in plus.values
    assert "num_layers" not in mu2.values and mu2.values["resolution"] == (16,) and "quality" not in mu2.values
    # docs/benchmarks.md §5.8:
    assert mu2.values["mu"] == (0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.24, 0.26, 0.28, 0.3)
    assert "mu" not in mun.values and mun.defaults["mu"] == 0.1  # muNet: one constant μ
    assert mu2.defaults["flip"] and not plus.defaults["flip"]  # μ2Net+ turns every augmentation off
    # A child of a root that fixes only some hyperparameters takes the rest from its segment's defaults.
    root = mu2net.Model(mu2net.ROOT, mu2net.ROOT, (), {"lr": 0.05}, {}, None, {})
    c = methods.Config(mu2, method=methods.Method(learned_mu=False, hp_moves=False))
    hp, _ = mu2net.mutate_hparams(root, c.space, c.method, train.Sampler(jax.random.key(0)))
    assert hp["lr"] == 0.05 and hp["crop_area_min"] == 0.05 and hp["resolution"] == 16


# --- faults and memory placement -------------------------------------------------------------------


class Poisoned:
    """A task whose training labels are out of range for the first child that asks (its data seed): its
    cross-entropy reads outside the logits (NaN), so that child diverges. Images stay uint8, as data.py gives them."""

    def __init__(self, task):
        self.task, self.seed = task, None

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_batch(self, seed, step, batch_size):
        x, y = self.task.train_batch(seed, step, batch_size)
        self.seed = seed if self.seed is None else self.seed
        return x, (np.full(y.shape, 10**6, np.int32) if seed == self.seed else y)


def test_a_diverged_child_is_discarded_and_the_iteration_goes_on(s0, tasks):
    log = []
    c = conf(generations=1, cycles=1, samples_cap=64)
    s = conftest.task_iteration(s0, Poisoned(tasks[0]), c, jax.random.key(4), log.append, jax.local_devices()[:1])
    (gone,) = [r for r in log if r["event"] == "discarded"]
    assert "loss nan" in gone["reason"]
    kept = s.models["digits"]
    assert kept.id != gone["child"] and np.isfinite(kept.metrics["quality"])
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(s.params))


def test_the_system_lives_in_host_memory(s0, tasks):
    """Components live in host memory (numpy); the devices hold the children in flight, and nothing of them stays
    once the task iteration is done (the published system is ~65 GB, more than any accelerator)."""
    import gc
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    s = conftest.task_iteration(s0, tasks[0], conf(generations=1, children=1, cycles=1, samples_cap=64),
                              jax.random.key(11))
    assert all(type(a) is np.ndarray for a in jax.tree.leaves((s.params, s.momentum)))
    gc.collect()
    left = [a for a in jax.live_arrays() if id(a) not in before]
    block = min(sum(a.nbytes for a in jax.tree.leaves(s.params[c])) for c in s.params if vit.is_block(mu2net.kind(c)))
    assert sum(a.nbytes for a in left) < block, [(a.shape, a.dtype) for a in left]
