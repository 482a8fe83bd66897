"""Strict config loading: unknown keys, types, YAML traps, overrides, path resolution, examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from influence_cli.config import Config, apply_override, load_config
from influence_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = """
model: {arch: logreg, kwargs: {in_features: 4, num_classes: 2}, checkpoint: m.pt}
data:
  train: {format: csv, path: train.csv}
"""


@pytest.fixture()
def cfg_path(tmp_path) -> Path:
    (tmp_path / "train.csv").write_text("a,label\n1,0\n")
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    return path


def test_defaults_and_relative_paths(cfg_path):
    cfg = load_config(cfg_path)
    assert cfg.solver.name == "direct" and cfg.solver.damping == 0.001 and cfg.batch_size == 256
    assert cfg.data.train.path == cfg_path.parent / "train.csv"
    assert cfg.model.checkpoint == cfg_path.parent / "m.pt"
    assert cfg.output.dir == cfg_path.parent / "reports"
    assert cfg.to_dict()["data"]["train"]["path"] == str(cfg_path.parent / "train.csv")


def test_scientific_notation_strings_are_numbers(cfg_path):
    cfg_path.write_text(BASE + "weight_decay: 1e-3\nsolver: {damping: 1e-2, cg: {tol: 1e-8}}\n")
    cfg = load_config(cfg_path)
    assert cfg.weight_decay == 1e-3 and cfg.solver.damping == 1e-2 and cfg.solver.cg.tol == 1e-8


@pytest.mark.parametrize(("text", "needle"), [
    ("solver: {nmae: cg}", "solver.nmae: unknown key (hint: did you mean solver.name?)"),
    ("batch_size: true", "batch_size: expected a whole number"),
    ("batch_size: 0", "batch_size: must be > 0"),
    ("seed: 1.5", "seed: expected a whole number"),
    ("seed: -1", "seed: must be a whole number in [0, 4294967295]"),
    ("seed: 99999999999999999999999", "seed: must be a whole number in [0, 4294967295]"),
    ("solver: {damping: .nan}", "solver.damping: expected a finite number"),
    ("solver: {damping: -1}", "solver.damping: must be >= 0"),
    ("device: no", "device: expected text"),
    ("task: regresion", "did you mean regression"),
    ("params: []", "params"),
    ("selfcheck: {flag_fraction: 2}", "selfcheck.flag_fraction"),
    ("solver: cg", "solver: expected a mapping"),
])
def test_bad_values_name_the_key(cfg_path, text, needle):
    cfg_path.write_text(BASE + text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg_path)
    assert needle in str(exc.value)


def test_required_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="model: required"):
        load_config(path)
    path.write_text("model: {arch: mlp}\ndata: {train: {format: torchvision, path: x}}\n")
    with pytest.raises(ConfigError, match="data.train.name: required"):
        load_config(path)


def test_overrides_are_validated_like_the_file(cfg_path):
    cfg = load_config(cfg_path, ["solver.damping=0.5", "params=[linear]", "solver.cg.max_iter=7"])
    assert cfg.solver.damping == 0.5 and cfg.params == ("linear",) and cfg.solver.cg.max_iter == 7
    with pytest.raises(ConfigError, match="solver.dampnig: unknown key"):
        load_config(cfg_path, ["solver.dampnig=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(cfg_path, ["solver.damping"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(cfg_path, ["model.arch.x=1"])


def test_not_a_mapping_and_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    assert isinstance(load_config(path), Config)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(min_size=1, max_size=12), value=st.one_of(st.none(), st.booleans(), st.integers(),
                                                              st.floats(allow_nan=True), st.text(max_size=8)))
def test_any_override_is_accepted_or_a_config_error(cfg_path, key, value):
    raw_value = "" if value is None else str(value)
    try:
        load_config(cfg_path, [f"{key}={raw_value}"])
    except ConfigError as e:
        assert e.message


def test_apply_override_builds_sections():
    raw: dict = {}
    apply_override(raw, "solver.cg.tol=1e-9")
    assert raw == {"solver": {"cg": {"tol": "1e-9"}}}


def test_test_split_inherits_group_carry_features(tmp_path):
    (tmp_path / "train.csv").write_text("a,label\n1,0\n")
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("path: train.csv}", "path: train.csv, group: src, carry: [note], features: [a]}")
                    + "  test: {format: csv, path: train.csv}\n")
    test = load_config(path).data.test
    assert (test.group, test.carry, test.features) == ("src", ("note",), ("a",))
    path.write_text(BASE.replace("path: train.csv}", "path: train.csv, group: src, carry: [note]}")
                    + "  test: {format: csv, path: train.csv, carry: [], group: null}\n")
    test = load_config(path).data.test
    assert (test.group, test.carry, test.features) == (None, (), None)
    path.write_text(BASE.replace("path: train.csv}", "path: train.csv, features: [a], carry: [b]}")
                    + "  test: {format: tensors, path: train.csv}\n")
    test = load_config(path).data.test
    assert (test.carry, test.features) == (("b",), None)  # tensors have no feature columns to inherit


# ---- issue 14: resource attacks and deep nesting fail fast with ConfigError


@pytest.fixture()
def alarm():
    """Fail (instead of hanging the suite) when the block takes more than 5 s."""
    import signal

    def stop(*_):
        raise TimeoutError("config loading hung")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 12))


def test_alias_bomb_fails_fast(cfg_path, alarm):
    import time

    cfg_path.write_text(BASE + "l0: &l0 lol\n" + BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"expands to more than .* values"):
        load_config(cfg_path)
    assert time.perf_counter() - start < 1.0
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x]"] + [f"&{c} [{', '.join([f'*{p}'] * 8)}]"
                            for p, c in zip("abcdefghi", "bcdefghij", strict=True)]) + "]"
    cfg_path.write_text(BASE)
    with pytest.raises(ConfigError, match=r"--set .*expands to more than"):
        load_config(cfg_path, [f"model.kwargs.x={bomb}"])


def test_small_aliases_still_work(cfg_path):
    cfg_path.write_text(BASE + "solver: {damping: &d 0.01}\nweight_decay: *d\n")
    assert load_config(cfg_path).weight_decay == 0.01


@pytest.mark.parametrize("text", ["x: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "".join("  " * i + f"k{i}:\n" for i in range(600)) + "  " * 600 + "v\n",
                                  "x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"])
def test_deeply_nested_config_is_config_error(cfg_path, alarm, text):
    cfg_path.write_text(BASE + text)
    with pytest.raises(ConfigError, match=r"nested more than \d+ levels deep|not valid YAML"):
        load_config(cfg_path)


def test_huge_config_file_is_refused(cfg_path, alarm):
    cfg_path.write_text(BASE + "# " + "x" * (2 * 2**20) + "\n")
    with pytest.raises(ConfigError, match=r"larger than 1 MiB"):
        load_config(cfg_path)


def test_self_referring_alias_is_config_error(cfg_path, alarm):
    cfg_path.write_text(BASE + "x: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to the value that contains it"):
        load_config(cfg_path)


def test_nesting_bomb_the_size_of_the_cap_fails_fast(cfg_path, alarm):
    """PyYAML's scanner slows quadratically with nesting (3000 brackets took 1 s, 6000 took 15 s):
    the depth is estimated from the text before it runs."""
    import time

    depth = 400_000
    for text in ("x: " + "[" * depth + "]" * depth + "\n", "x: " + "{a: " * 200_000 + "1" + "}" * 200_000 + "\n",
                 "".join("  " * i + f"k{i}:\n" for i in range(900)) + "  " * 900 + "v\n"):
        cfg_path.write_text(BASE + text)
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=r"nested more than 64 levels deep"):
            load_config(cfg_path)
        assert time.perf_counter() - start < 5.0  # the scanner alone would take minutes; loose for loaded CI


def test_brackets_inside_quotes_and_comments_do_not_count(cfg_path):
    cfg_path.write_text(BASE + "# " + "[" * 100 + "\nmodel: {arch: logreg, kwargs: {note: '" + "[" * 100
                        + "', in_features: 4, num_classes: 2}, checkpoint: m.pt}\n")
    assert load_config(cfg_path).model.kwargs["note"] == "[" * 100
