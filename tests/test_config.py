"""YAML config: known keys only, errors that name the line, and the documented precedence."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bon_tracker.backends import BACKENDS
from bon_tracker.backends.local import read_records
from bon_tracker.tracking.config import ConfigError, TrackerConfig, load_config, resolve_config, tracker_from_config


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


FULL = """
backend: mlflow
ns: [1, 2, 4, 8]
key_prefix: rm
eval_every: 50
proxy_name: reward model
true_name: gold RM
nan_policy: omit
run_name: ppo-1
spool_dir: /tmp/spool
mlflow:
  tracking_uri: sqlite:///mlflow.db
  experiment: goodhart
  charts: false
wandb:
  project: goodhart
local:
  root: runs
"""


def test_load_full_config(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", FULL))
    assert config.backend == "mlflow" and config.ns == (1, 2, 4, 8) and config.key_prefix == "rm"
    assert config.eval_every == 50 and config.nan_policy == "omit" and config.run_name == "ppo-1"
    assert (config.proxy_name, config.true_name) == ("reward model", "gold RM")
    assert config.backend_options() == {
        "tracking_uri": "sqlite:///mlflow.db",
        "experiment": "goodhart",
        "charts": False,
        "run_name": "ppo-1",
    }
    assert config.backend_options("local") == {"root": "runs", "run_name": "ppo-1"}
    assert config.sources["eval_every"].endswith("c.yaml line 4")
    kwargs = config.tracker_kwargs()
    assert kwargs == {
        "backend": "mlflow",
        "ns": [1, 2, 4, 8],
        "run_name": "ppo-1",
        "key_prefix": "rm",
        "nan_policy": "omit",
        "proxy_name": "reward model",
        "true_name": "gold RM",
        "spool_dir": "/tmp/spool",
        "finish_timeout": 30.0,
        "tracking_uri": "sqlite:///mlflow.db",
        "experiment": "goodhart",
        "charts": False,
    }


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "# nothing yet\n")) == TrackerConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backend: local\nnss: [1, 2]\n", r"c\.yaml line 2: unknown key 'nss'; did you mean 'ns'\?"),
        (
            "backend: local\n\neval_every: ten\n",
            r"c\.yaml line 3, key 'eval_every': expected a positive integer, "
            r"got 'ten'",
        ),
        ("eval_every: 0\n", r"line 1, key 'eval_every': expected a positive integer"),
        ("eval_every: true\n", r"line 1, key 'eval_every': expected a positive integer, got True"),
        ("ns: [1, two, 4]\n", r"line 1, key 'ns': expected a list of integers >= 1"),
        ("ns: [0, 1]\n", r"line 1, key 'ns': expected a list of integers >= 1"),
        ("backend: neptune\n", rf"line 1, key 'backend': expected one of {', '.join(BACKENDS)}, got 'neptune'"),
        ("nan_policy: ignore\n", r"line 1, key 'nan_policy': expected 'raise' or 'omit'"),
        ("key_prefix: ''\n", r"line 1, key 'key_prefix': expected a non-empty string"),
        ("proxy_name: [a]\n", r"line 1, key 'proxy_name': expected a string"),
        ("backend: local\nbackend: mlflow\n", r"line 2: key 'backend' repeats line 1"),
        (
            "local:\n  root: runs\n  rooot: x\n",
            r"line 3: unknown option of the local backend 'rooot'; did you mean "
            r"'root'\?",
        ),
        ("local:\n  charts: yes please\n", r"line 2, key 'local.charts': expected true or false"),
        ("mlflow: sqlite:///x.db\n", r"line 1, key 'mlflow': expected a mapping of mlflow backend options"),
        ("- backend: local\n", r"line 1: the config must be a mapping of keys"),
        ("backend: local\nns: [1, 2\n", r"c\.yaml line \d: invalid YAML"),
        ("backend: !!python/object/apply:os.system ['echo pwned']\n", r"line 1: invalid YAML"),
    ],
)
def test_bad_config_names_key_and_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "c.yaml", text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        resolve_config(tmp_path / "absent.yaml", environ={})


def test_ns_forms(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "ns: 1, 2, 4\n")).ns == (1, 2, 4)
    assert load_config(write(tmp_path / "c.yaml", "ns: 8\n")).ns == (8,)
    assert load_config(write(tmp_path / "c.yaml", "ns:\n")).ns is None


def test_precedence_explicit_over_environment_over_file_over_defaults(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        """
        backend: local
        ns: [1, 2]
        key_prefix: from_file
        eval_every: 10
        true_name: file-gold
        local:
          root: file-root
    """,
    )
    environ = {"BON_TRACKER_NS": "1,2,4", "BON_TRACKER_KEY_PREFIX": "from_env", "BON_TRACKER_DIR": "env-root"}
    config = resolve_config(path, environ=environ, key_prefix="explicit", proxy_name=None)
    assert config.key_prefix == "explicit"  # explicit > environment > file
    assert config.ns == (1, 2, 4)  # environment > file
    assert config.eval_every == 10 and config.true_name == "file-gold"  # file > defaults
    assert config.proxy_name == "proxy" and config.nan_policy == "raise"  # defaults (None = not given)
    assert config.backend_options()["root"] == "env-root"  # $BON_TRACKER_DIR > local.root of the file
    assert config.sources["key_prefix"] == "argument" and config.sources["ns"] == "$BON_TRACKER_NS"
    assert config.sources["nan_policy"] == "default"
    explicit_root = resolve_config(path, environ=environ, root="arg-root")
    assert explicit_root.backend_options()["root"] == "arg-root"


def test_environment_errors_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="environment variable BON_TRACKER_EVAL_EVERY: expected a positive integer"):
        resolve_config(environ={"BON_TRACKER_EVAL_EVERY": "often"})
    with pytest.raises(ConfigError, match="BON_TRACKER_BACKEND: expected one of local, mlflow, wandb"):
        resolve_config(environ={"BON_TRACKER_BACKEND": "neptune"})


def test_explicit_errors_name_the_argument():
    with pytest.raises(ConfigError, match="argument ns: expected a list of integers"):
        resolve_config(environ={}, ns=[1, -2])
    with pytest.raises(ConfigError, match="argument rooot: unknown option of the local backend 'rooot'"):
        resolve_config(environ={}, backend="local", rooot="x")


def test_config_file_discovery(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(environ={}).key_prefix == "bon"  # no file: defaults
    write(tmp_path / "bon_tracker.yaml", "key_prefix: cwd\n")
    assert resolve_config(environ={}).key_prefix == "cwd"
    other = write(tmp_path / "other.yaml", "key_prefix: env_file\n")
    assert resolve_config(environ={"BON_TRACKER_CONFIG": str(other)}).key_prefix == "env_file"
    named = write(tmp_path / "named.yaml", "key_prefix: named\n")
    assert resolve_config(named, environ={"BON_TRACKER_CONFIG": str(other)}).key_prefix == "named"


def test_is_eval_step():
    config = TrackerConfig(eval_every=50)
    assert [s for s in range(0, 201, 25) if config.is_eval_step(s)] == [0, 50, 100, 150, 200]


def test_tracker_from_config_logs_with_the_configured_settings(tmp_path, monkeypatch, rng):
    monkeypatch.delenv("BON_TRACKER_DIR", raising=False)
    path = write(
        tmp_path / "c.yaml",
        f"""
        backend: local
        ns: [1, 2, 8]
        key_prefix: rm
        run_name: from-config
        local:
          root: {tmp_path / "runs"}
          charts: false
    """,
    )
    with tracker_from_config(path, spool_dir=tmp_path / "spool") as tracker:
        tracker.log_scores(5, rng.normal(size=(4, 8)), rng.normal(size=(4, 8)))
    run_dir = tmp_path / "runs" / "from-config"
    (record,) = read_records(run_dir)
    assert record.step == 5 and record.curve.n.tolist() == [1, 2, 8] and record.key_prefix == "rm"
    scalars = json.loads((run_dir / "scalars.jsonl").read_text().splitlines()[0])
    assert "rm/1_true/n0008" in scalars
    assert not (run_dir / "charts" / "trend.png").exists()  # local.charts: false reached the backend


def test_tracker_from_config_explicit_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BON_TRACKER_NS", "1,2")
    write(tmp_path / "bon_tracker.yaml", "ns: [1, 2, 4]\nkey_prefix: file\n")
    tracker = tracker_from_config(ns=[1, 4, 16], root=str(tmp_path / "runs"))
    assert tracker.ns == [1, 4, 16] and tracker.key_prefix == "file"
    tracker.finish()


def test_yaml_alias_bomb_is_refused_quickly_and_messages_stay_short(tmp_path):
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for name, prev in zip("bcdefghi", "abcdefgh"):
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    for key in ("ns", "run_name"):
        path = write(tmp_path / f"{key}.yaml", bomb.replace("a: &a", f"{key}: &a", 1))
        start = time.perf_counter()
        with pytest.raises(ConfigError, match="expands to more than 10,000 values") as err:
            load_config(path)
        assert time.perf_counter() - start < 5 and len(str(err.value)) < 400
    path = write(tmp_path / "long.yaml", "run_name: [" + ", ".join(["abcdefgh"] * 500) + "]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(str(err.value)) < 400  # the value is quoted as a short prefix, not whole


def test_bontracker_itself_follows_one_precedence_explicit_env_yaml_default(tmp_path, monkeypatch):
    """BonTracker() reads bon_tracker.yaml and BON_TRACKER_* as tracker_from_config does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bon_tracker.yaml").write_text(
        "backend: mlflow\nns: [1, 2]\nkey_prefix: yaml\nproxy_name: rm\nmlflow:\n"
        f"  tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n  experiment: from-yaml\n"
    )
    from bon_tracker import BonTracker

    tracker = BonTracker()
    assert tracker.backend.name == "mlflow" and tracker.backend.spec()["experiment"] == "from-yaml"
    assert (tracker.ns, tracker.key_prefix, tracker.proxy_name) == ([1, 2], "yaml", "rm")
    monkeypatch.setenv("BON_TRACKER_NS", "1,4")
    monkeypatch.setenv("BON_TRACKER_KEY_PREFIX", "env")
    monkeypatch.setenv("BON_TRACKER_RUN_NAME", "env-run")
    monkeypatch.setenv("BON_TRACKER_PROXY_NAME", "env-rm")
    tracker = BonTracker()
    assert (tracker.ns, tracker.key_prefix, tracker.proxy_name) == ([1, 4], "env", "env-rm")
    assert tracker.backend.spec()["run_name"] == "env-run"
    tracker = BonTracker("local", root=tmp_path / "runs", ns=[1], key_prefix="arg", run_name="arg-run")
    assert (tracker.backend.name, tracker.ns, tracker.key_prefix) == ("local", [1], "arg")
    assert tracker.backend.spec()["run_name"] == "arg-run"


def test_a_misspelt_backend_option_says_what_was_meant(tmp_path):
    from bon_tracker import BonTracker

    with pytest.raises(TypeError, match="unknown option of the local backend 'run_nme'; did you mean 'run_name'"):
        BonTracker("local", root=tmp_path, run_nme="x")
