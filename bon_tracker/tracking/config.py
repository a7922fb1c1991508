"""One YAML config for the tracker and the ``bon-tracker`` command.

A config file (``--config``, ``$BON_TRACKER_CONFIG``, or ``bon_tracker.yaml`` in the
working directory) sets the backend and its options, the n grid, the key prefix,
the evaluation cadence, the reward names and the NaN policy::

    backend: mlflow            # local (default), mlflow or wandb
    ns: [1, 2, 4, 8, 16, 32]   # best-of-n grid (default: powers of two up to N, plus N)
    key_prefix: bon            # metric keys: bon/true/n16, ...
    eval_every: 500            # trainer integrations compute curves every 500 steps
    proxy_name: reward model   # labels in charts and reports
    true_name: gold RM
    nan_policy: raise          # or omit: drop NaN/inf samples
    run_name: ppo-lr1e-5
    spool_dir: /scratch/bon_spool
    mlflow:                    # options of each backend, used when it is selected
      tracking_uri: sqlite:///mlflow.db
      experiment: goodhart
    wandb:
      project: goodhart
    local:
      root: bon_runs
    alerts:                    # the alert rules (docs/alerts.md); `alerts: off` turns them off
      fall_z: 2.5
      kl_budget: 10

Precedence, highest first: explicit arguments (Python keywords, command-line
options) > environment variables (``BON_TRACKER_BACKEND``, ``BON_TRACKER_NS``,
``BON_TRACKER_KEY_PREFIX``, ``BON_TRACKER_EVAL_EVERY``, ``BON_TRACKER_PROXY_NAME``,
``BON_TRACKER_TRUE_NAME``, ``BON_TRACKER_NAN_POLICY``, ``BON_TRACKER_RUN_NAME``,
``BON_TRACKER_SPOOL_DIR``, ``BON_TRACKER_ALERTS`` (``off``, ``on`` or a JSON object of
alert settings such as ``{"fall_z": 2.5}``), and ``BON_TRACKER_DIR`` for the local root) >
the config file > defaults. A layer's ``alerts`` replaces the settings of the layers below.

Files are read with ``yaml.safe_load`` semantics only (no Python objects). Unknown
keys, duplicate keys and values of the wrong type are errors naming the key and its
line.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bon_tracker.backends import BACKENDS, backend_class
from bon_tracker.core.alerts import AlertRules

if TYPE_CHECKING:
    import yaml

    from bon_tracker.tracking.tracker import BonTracker

DEFAULT_CONFIG_FILE = "bon_tracker.yaml"
CONFIG_ENV = "BON_TRACKER_CONFIG"
BACKEND_NAMES = tuple(BACKENDS)  # the registry decides
ENV_PREFIX = "BON_TRACKER_"


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; a bigger one is a mistake
MAX_CONFIG_NODES = 10_000  # values after YAML aliases are expanded: a bound on alias bombs
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 8, 8, 3


def _short(value: Any) -> str:
    """A value for a message: a short prefix, bounded in time and size whatever its nesting."""
    return _SHORT.repr(value)


class ConfigError(ValueError):
    """A config value that is unknown or of the wrong type; the message says where."""


@dataclass(frozen=True)
class TrackerConfig:
    """Settings shared by :class:`~bon_tracker.tracking.tracker.BonTracker`, trainer integrations
    and the ``bon-tracker`` command. Build one with :func:`resolve_config`.

    ``local``, ``mlflow`` and ``wandb`` hold the options of each backend (the keyword
    arguments of its class); only the selected backend's are used. ``sources`` says
    where each value set came from (``"default"`` when absent), for messages.
    """

    backend: str = "local"
    ns: tuple[int, ...] | None = None
    key_prefix: str = "bon"
    eval_every: int = 1
    proxy_name: str = "proxy"
    true_name: str = "true"
    nan_policy: str = "raise"
    run_name: str | None = None
    spool_dir: str | None = None
    finish_timeout: float = 30.0
    alerts: AlertRules | bool | None = None  # None: the default rules; False: off
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # backend name -> its options
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __getattr__(self, name: str) -> Mapping[str, Any]:
        """``config.mlflow``, ``config.local``...: the options section of a registered backend."""
        if name in BACKENDS:
            return self.sections.get(name, {})
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def backend_options(self, backend: str | None = None) -> dict[str, Any]:
        """Options of ``backend`` (default: the selected one), with ``run_name`` added."""
        backend = backend or self.backend
        options = dict(self.sections.get(backend, {}))
        known = _backend_parameters(backend)
        if self.run_name is not None and (known is None or "run_name" in known):
            options.setdefault("run_name", self.run_name)
        return options

    def tracker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``BonTracker(**kwargs)`` for these settings."""
        options = self.backend_options()
        run_name = options.pop("run_name", None)
        return {
            "backend": self.backend,
            "ns": None if self.ns is None else list(self.ns),
            "run_name": run_name,
            "key_prefix": self.key_prefix,
            "nan_policy": self.nan_policy,
            "proxy_name": self.proxy_name,
            "true_name": self.true_name,
            "spool_dir": self.spool_dir,
            "finish_timeout": self.finish_timeout,
            **({} if self.alerts is None else {"alerts": self.alerts}),
            **options,
        }

    def is_eval_step(self, step: int) -> bool:
        """Whether a trainer integration computes curves at ``step`` (every ``eval_every``)."""
        return int(step) % self.eval_every == 0


# ---- validation of one value ---------------------------------------------------------------------------


def _check_str(value: Any, what: str = "a string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected {what}, got {_short(value)}")
    return value


def _check_backend(value: Any) -> str:
    if value not in BACKEND_NAMES:
        raise ValueError(f"expected one of {', '.join(BACKEND_NAMES)}, got {_short(value)}")
    return value


def _check_ns(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value
    if isinstance(value, str):
        items = [part for part in value.replace(",", " ").split() if part]
        try:
            items = [int(part) for part in items]
        except ValueError:
            raise ValueError(f"expected a list of integers >= 1 (e.g. [1, 2, 4, 8]), got {_short(value)}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, (list, tuple)) and not hasattr(items, "tolist"):
        raise ValueError(f"expected a list of integers >= 1 (e.g. [1, 2, 4, 8]), got {_short(value)}")
    items = list(items.tolist() if hasattr(items, "tolist") else items)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or not items:
        raise ValueError(f"expected a list of integers >= 1 (e.g. [1, 2, 4, 8]), got {_short(value)}")
    return tuple(items)


def _check_positive_int(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {_short(value)}")
    return value


def _check_prefix(value: Any) -> str:
    value = _check_str(value, "a non-empty string such as 'bon'")
    if not value.strip("/"):
        raise ValueError(f"expected a non-empty string such as 'bon', got {_short(value)}")
    return value


def _check_nan_policy(value: Any) -> str:
    if value not in ("raise", "omit"):
        raise ValueError(f"expected 'raise' or 'omit', got {_short(value)}")
    return value


def _check_optional_str(value: Any) -> str | None:
    return None if value is None else _check_str(value)


def _check_path(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return _check_str(value, "a path")


def _check_seconds(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number of seconds >= 0, got {_short(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a number of seconds >= 0, got {_short(value)}")
    return float(value)


_ALERTS_HINT = "a mapping of alert settings (such as {fall_z: 2.5}), true or false"
_OFF_WORDS, _ON_WORDS = ("off", "false", "no", "0", "none"), ("on", "true", "yes", "1")


def _check_alerts(value: Any) -> AlertRules | bool | None:
    """``alerts``: a mapping onto :meth:`AlertRules.from_dict`, true (the defaults) or false (off);
    from the environment also ``off``/``on`` or a JSON object."""
    if value is None or isinstance(value, AlertRules):
        return value
    if isinstance(value, bool):
        return AlertRules() if value else False
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _OFF_WORDS:
            return False
        if text.lower() in _ON_WORDS:
            return AlertRules()
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"expected {_ALERTS_HINT}, or a JSON object, got {_short(text)}") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected {_ALERTS_HINT}, or a JSON object, got {_short(text)}")
    if not isinstance(value, Mapping):
        raise ValueError(f"expected {_ALERTS_HINT}, got {_short(value)}")
    return AlertRules.from_dict(value)  # ValueError naming the setting


_CHECKS = {
    "backend": _check_backend,
    "ns": _check_ns,
    "key_prefix": _check_prefix,
    "eval_every": _check_positive_int,
    "proxy_name": _check_str,
    "true_name": _check_str,
    "nan_policy": _check_nan_policy,
    "run_name": _check_optional_str,
    "spool_dir": _check_path,
    "finish_timeout": _check_seconds,
    "alerts": _check_alerts,
}
KNOWN_KEYS = (*_CHECKS, *BACKEND_NAMES)
_ENV_KEYS = {key: ENV_PREFIX + key.upper() for key in _CHECKS}  # BON_TRACKER_NS, ...
_SCALAR_OPTION_TYPES = (str, int, float, bool, type(None))


def _backend_parameters(backend: str) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments the backend class accepts; None if it cannot be imported
    here (an optional dependency missing): its options are then checked when it is built."""
    try:
        cls = backend_class(backend)
    except (ImportError, AttributeError):
        return None
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name != "self" and p.kind is p.KEYWORD_ONLY}


def _check_option(backend: str, key: str, value: Any, known: dict[str, inspect.Parameter] | None) -> Any:
    if known is not None and key not in known:
        raise KeyError(_unknown(key, list(known), f"option of the {backend} backend"))
    if known is not None:
        default = known[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_short(value)}")
        if (
            isinstance(default, int)
            and not isinstance(default, bool)
            and (isinstance(value, bool) or not isinstance(value, int))
        ):
            raise ValueError(f"expected an integer, got {_short(value)}")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def unknown_backend_options(backend: str, options: Mapping[str, Any]) -> None:
    """A ``TypeError`` naming an option the backend does not take, with the closest one."""
    known = _backend_parameters(backend)
    if known is None:
        return
    for key in options:
        if key not in known:
            raise TypeError(_unknown(key, list(known), f"option of the {backend} backend"))


def _unknown(key: str, known: list[str], what: str = "key") -> str:
    guess = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"unknown {what} {key!r}{hint} (known: {', '.join(known)})"


# ---- the YAML file ---------------------------------------------------------------------------------------


def _where(path: Path, line: int | None) -> str:
    return f"{path} line {line}" if line is not None else str(path)


def _mapping_lines(path: Path, node: yaml.MappingNode) -> dict[str, tuple[int, Any]]:
    """{key: (line, value node)} of a YAML mapping; duplicate or non-string keys are errors."""
    import yaml

    out: dict[str, tuple[int, Any]] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{_where(path, line)}: keys must be plain names, not a {key_node.id}")
        key = key_node.value
        if key in out:
            raise ConfigError(f"{_where(path, line)}: key {key!r} repeats line {out[key][0]}; keep one")
        out[key] = (line, value_node)
    return out


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, Any]]]:
    import yaml  # imported when a config is read, not when bon_tracker is

    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: the config file is larger than {MAX_CONFIG_BYTES // 1024} KiB")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_size(path, node, yaml)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"{_where(path, line)}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        raise ConfigError(
            f"{_where(path, node.start_mark.line + 1)}: the config must be a mapping of keys "
            f"(such as 'backend: mlflow'), not a {type(data).__name__}"
        )
    return data, _mapping_lines(path, node)


def _check_size(path: Path, node: Any, yaml: Any) -> None:
    """Refuse a document that expands to more than ``MAX_CONFIG_NODES`` values: aliases
    share nodes, so a few lines can stand for billions of values (an alias bomb)."""
    stack, count = [node], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{_where(path, item.start_mark.line + 1)}: the config expands to more than {MAX_CONFIG_NODES:,} "
                "values (YAML aliases?); a bon_tracker config is a few keys"
            )
        if isinstance(item, yaml.SequenceNode):
            stack.extend(item.value)
        elif isinstance(item, yaml.MappingNode):
            stack.extend(part for pair in item.value for part in pair)


def load_config(path: str | os.PathLike[str], base: TrackerConfig | None = None) -> TrackerConfig:
    """Read a YAML config file over ``base`` (default: the defaults).

    Raises:
        ConfigError: unreadable YAML, an unknown or repeated key, or a value of the
            wrong type; the message names the file, the line and the key.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "bon_tracker.yaml"
        >>> _ = path.write_text("backend: local\\nns: [1, 2, 4]\\nlocal:\\n  root: runs\\n")
        >>> config = load_config(path)
        >>> config.ns, config.backend_options()
        ((1, 2, 4), {'root': 'runs'})
        >>> _ = path.write_text("backend: local\\neval_evry: 10\\n")
        >>> load_config(path)
        Traceback (most recent call last):
        ...
        bon_tracker.tracking.config.ConfigError: ... line 2: unknown key 'eval_evry'; did you mean 'eval_every'? ...
    """
    path = Path(path)
    data, lines = _read_yaml(path)
    config = base or TrackerConfig()
    values: dict[str, Any] = {}
    sections = {name: dict(options) for name, options in config.sections.items()}
    sources = dict(config.sources)
    for key, (line, value_node) in lines.items():
        where = _where(path, line)
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{where}: {_unknown(key, list(KNOWN_KEYS))}")
        value = data[key]
        if key in BACKEND_NAMES:
            sections[key] = {**sections.get(key, {}), **_backend_section(path, key, value, value_node)}
            sources[key] = where
            continue
        if key == "alerts" and isinstance(value, dict):
            _check_alert_lines(path, value, value_node)  # an error names the setting's own line
        try:
            values[key] = _CHECKS[key](value)
        except ValueError as err:
            raise ConfigError(f"{where}, key {key!r}: {err}") from None
        sources[key] = where
    return replace(config, **values, sections=sections, sources=sources)


def _check_alert_lines(path: Path, value: dict[str, Any], node: Any) -> None:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    for key, (line, _) in _mapping_lines(path, node).items():
        try:
            AlertRules.from_dict({key: value[key]})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{_where(path, line)}, key 'alerts.{key}': {err}") from None


def _backend_section(path: Path, backend: str, value: Any, node: Any) -> dict[str, Any]:
    import yaml

    if value is None:
        return {}
    if not isinstance(value, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(
            f"{_where(path, node.start_mark.line + 1)}, key {backend!r}: expected a mapping of "
            f"{backend} backend options (such as 'root: bon_runs'), got {_short(value)}"
        )
    known = _backend_parameters(backend)
    out = {}
    for key, (line, _) in _mapping_lines(path, node).items():
        try:
            out[key] = _check_option(backend, key, value[key], known)
        except KeyError as err:
            raise ConfigError(f"{_where(path, line)}: {err.args[0]}") from None
        except ValueError as err:
            raise ConfigError(f"{_where(path, line)}, key '{backend}.{key}': {err}") from None
        if not isinstance(out[key], (*_SCALAR_OPTION_TYPES, list, dict)):
            raise ConfigError(f"{_where(path, line)}, key '{backend}.{key}': unsupported value {value[key]!r}")
    return out


# ---- layering -------------------------------------------------------------------------------------------------


def find_config_file(
    config_path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The config file to use: ``config_path``, else ``$BON_TRACKER_CONFIG``, else
    ``./bon_tracker.yaml`` if it exists, else None. A named file must exist."""
    environ = os.environ if environ is None else environ
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return path
    if environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file (named by ${CONFIG_ENV})")
        return path
    path = Path(DEFAULT_CONFIG_FILE)
    return path if path.is_file() else None


def _from_environment(config: TrackerConfig, environ: Mapping[str, str]) -> TrackerConfig:
    values: dict[str, Any] = {}
    sources = dict(config.sources)
    for key, name in _ENV_KEYS.items():
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[key] = _CHECKS[key](raw)
        except ValueError as err:
            raise ConfigError(f"environment variable {name}: {err}") from None
        sources[key] = f"${name}"
    sections = dict(config.sections)
    if environ.get("BON_TRACKER_DIR"):
        sections["local"] = {**config.sections.get("local", {}), "root": environ["BON_TRACKER_DIR"]}
        sources["local.root"] = "$BON_TRACKER_DIR"
    return replace(config, **values, sections=sections, sources=sources)


def _from_arguments(config: TrackerConfig, explicit: Mapping[str, Any]) -> TrackerConfig:
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    sections = {name: dict(section) for name, section in config.sections.items()}
    sources = dict(config.sources)
    for key, value in explicit.items():
        if value is None:
            continue  # not given
        if key in _CHECKS:
            try:
                values[key] = _CHECKS[key](value)
            except ValueError as err:
                raise ConfigError(f"argument {key}: {err}") from None
            sources[key] = "argument"
        elif key in BACKEND_NAMES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"argument {key}: expected a mapping of {key} backend options, got {_short(value)}")
            sections[key] = {**sections.get(key, {}), **value}
            sources[key] = "argument"
        else:
            options[key] = value
    backend = values.get("backend", config.backend)
    if options:
        known = _backend_parameters(backend)
        for key, value in options.items():
            try:
                options[key] = _check_option(backend, key, value, known)
            except KeyError as err:
                raise ConfigError(f"argument {key}: {err.args[0]}") from None
            except ValueError as err:
                raise ConfigError(f"argument {key}: {err}") from None
            sources[f"{backend}.{key}"] = "argument"
        sections[backend] = {**sections.get(backend, {}), **options}
    return replace(config, **values, sections=sections, sources=sources)


def resolve_config(
    config_path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **explicit: Any,
) -> TrackerConfig:
    """Settings from every layer: explicit arguments > environment > config file > defaults.

    Args:
        config_path: a YAML file; default ``$BON_TRACKER_CONFIG``, else
            ``./bon_tracker.yaml`` when it exists, else none.
        environ: the environment to read (default ``os.environ``).
        **explicit: config keys (``backend``, ``ns``, ``key_prefix``, ...; None means
            "not given"), a backend section (``mlflow={...}``), or options of the
            selected backend (``tracking_uri=...``, ``root=...``).

    Example:
        >>> config = resolve_config(environ={"BON_TRACKER_NS": "1,2,4"}, backend="local", root="/tmp/runs")
        >>> config.ns, config.backend_options()["root"], config.sources["ns"]
        ((1, 2, 4), '/tmp/runs', '$BON_TRACKER_NS')
    """
    environ = os.environ if environ is None else environ
    config = TrackerConfig(
        sources={f.name: "default" for f in fields(TrackerConfig) if f.name not in ("sources", "sections")}
    )
    path = find_config_file(config_path, environ)
    if path is not None:
        config = load_config(path, config)
    config = _from_environment(config, environ)
    return _from_arguments(config, explicit)


def tracker_from_config(
    config_path: str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    **explicit: Any,
) -> BonTracker:
    """A :class:`~bon_tracker.tracking.tracker.BonTracker` built from :func:`resolve_config`.

    Example:
        >>> import tempfile
        >>> tracker = tracker_from_config(backend="local", root=tempfile.mkdtemp(), ns=[1, 2])
        >>> tracker.ns, tracker.key_prefix
        ([1, 2], 'bon')
    """
    from bon_tracker.tracking.tracker import BonTracker

    config = resolve_config(config_path, **explicit)
    kwargs = config.tracker_kwargs()
    return BonTracker(kwargs.pop("backend"), resume=resume, **kwargs)
