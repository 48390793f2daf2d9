"""The one shape of the four commands (train.py, mine.py, score.py, `python -m embedder.evaluate`).

Each entry point is `run_entry("<config name>", <run function>)`: the config resolvers, the check of `key=value`
overrides against the config (unknown keys listed with the valid ones), Hydra, and one `error:` line with exit code 1
for bad input (`embedder.errors.ReportedInputErrors`). The run function lives in the package and takes the
composed config, so tests call it directly. What it returns is a metrics dict; a sweeper gets `optimized_metric`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def optimized_value(cfg: Any, result: Any) -> float | None:
    """The value a sweeper optimises: `optimized_metric` in the returned metrics (`val/<set>/<metric>` as train.py
    logs it, or `<set>/<metric>` as evaluate returns it)."""
    key = cfg.get("optimized_metric") if hasattr(cfg, "get") else None
    if not key or not isinstance(result, dict):
        return None
    if key in result:
        return result[key]
    return result.get(key[len("val/"):] if key.startswith("val/") else key)


def run_entry(config_name: str, run: Callable[[Any], Any] | str) -> None:
    """Run `run(cfg)` as a Hydra command on configs/<config_name>.yaml (see the module docstring). `run` may be named
    as `"module:function"`: it is imported after the config is checked, so a bad key or value is reported in a
    second, without importing torch and the model stack first."""
    import hydra

    from embedder import stopping
    from embedder.config import CONFIG_DIR, register_resolvers
    from embedder.config_check import apply_deprecated_aliases, check_values, exit_on_unknown_keys, migrate_renamed_keys
    from embedder.errors import ReportedInputErrors

    register_resolvers()
    stopping.install()  # SIGTERM: stop between units of work, exit 143 (Lightning chains this handler)
    apply_deprecated_aliases(config_name)  # renamed keys: the old spelling works for one release, with a warning
    exit_on_unknown_keys(config_name)

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def main(cfg) -> float | None:
        for warning in migrate_renamed_keys(cfg, config_name):  # old names in a user's own YAML, for one release
            print(warning, file=sys.stderr)
        with ReportedInputErrors():
            check_values(cfg)  # bad values: one line naming the key, before any data or model is read
            if isinstance(run, str):
                import importlib
                import logging

                module, _, name = run.partition(":")
                fn = getattr(importlib.import_module(module), name)
                # Lightning imported after Hydra set up logging propagates its records to Hydra's root handlers,
                # and the `lightning` package logger also prints them with its own console handler: each line
                # would show twice. Hydra's handlers (console and the job's log file) are the ones to keep.
                if logging.getLogger().handlers:
                    lg = logging.getLogger("lightning")
                    for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
                        lg.removeHandler(h)
                result = fn(cfg)
            else:
                result = run(cfg)
        return optimized_value(cfg, result)

    main()
