"""Bad input to any mm command: one line on stderr, `<prog>: error: <what, naming the key / flag / file>`, and
exit status 2 (`BAD_INPUT`, argparse's own status for usage errors), before anything heavy starts.

Bad input is an unknown or mistyped `--config.*` key, a value of the wrong type, a config file that is not
there or a variant (stage / preset) it does not define, an unknown flag, or an input path that is not there.
`absl_flags_parser` gives `absl.app.run` (mm-train) these checks for `--config` and its overrides; `run`
turns the errors mm raises for bad input (`ConfigError`, `ConversionError`) into the same line for any
command. argparse's own usage errors already exit 2 (usage line, then `prog: error: ...`).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Sequence

BAD_INPUT = 2  # exit status for bad input: flags, config keys and values, paths


def report(prog: str, error: BaseException | str) -> int:
    """Writes `prog: error: message` on one line of stderr; returns `BAD_INPUT`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    sys.stderr.write(f"{prog}: error: {'; '.join(lines)}\n")
    return BAD_INPUT


def input_errors() -> tuple[type[BaseException], ...]:
    """The exception types mm raises for bad input (each message names the key / file at fault)."""
    from mm.config import ConfigError
    from mm.checkpoints.errors import ConversionError

    return ConfigError, ConversionError


def run(prog: str, fn: Callable[..., int], *args: Any, bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """`fn(*args)`, with mm's bad-input errors (and `bad_input`) reported by `report` (status 2)."""
    try:
        return fn(*args)
    except input_errors() + bad_input as e:
        return report(prog, e)


def require_paths(**paths: str | None) -> None:
    """ConfigError naming the flag (`image_root="x"` -> `--image-root`) of the first given path that does not
    exist; None / "" are skipped (optional flags not given)."""
    from pathlib import Path

    from mm.config import ConfigError

    for flag, path in paths.items():
        if path and not Path(path).exists():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file or directory")


def add_process_flags(parser: Any) -> None:
    """The flags of a tool whose processes split the rows (`jax.distributed`, `mm.sharding.initialize_distributed`):
    process I of N takes rows I::N."""
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (jax.distributed)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)


# ------------------------------------------------------------------------- absl / ml_collections flags
def _config_spec(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=SPEC` / `--name SPEC` in argv (the last one given), as absl reads it."""
    spec = None
    for i, arg in enumerate(argv):
        m = re.match(rf"^-{{1,2}}{name}(=|$)", arg)
        if m:
            spec = arg[m.end():] if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return spec


def _override_keys(argv: Sequence[str], name: str) -> list[str]:
    """The dotted keys of `--name.a.b=value` (and boolean `--[no]name.a.b`) overrides, in order."""
    return [re.sub(rf"^-{{1,2}}(no)?{name}\.", "", arg.split("=", 1)[0]) for arg in argv
            if re.match(rf"^-{{1,2}}(no)?{name}\.", arg)]


def check_override_keys(cfg: Any, keys: Sequence[str]) -> None:
    """ConfigError for the first key that is not in `cfg` (a ConfigDict), naming the valid keys near it."""
    from mm.config import ConfigError, unknown_key_error

    for key in keys:
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            parent = ".".join(parts[:i])
            if not hasattr(node, "keys"):
                raise ConfigError(f"config key {key!r}: {parent!r} is a value ({node!r}), not a section")
            if part not in node:
                raise unknown_key_error(key, parent, part, node.keys())
            node = node[part]


def _value_error(error: Exception, cfg: Any, name: str) -> str:
    """absl's message for a rejected flag, as one line naming the config key and the type it needs."""
    m = re.match(rf"^flag --(?:no)?{name}\.([^=\s]+)=(.*?): ", str(error))
    if cfg is None or not m:
        return str(error)
    key, value = m.groups()
    node = cfg
    for part in key.split("."):
        node = node[part]
    return f"config key {key!r} = {value!r}: expected {type(node).__name__} (the config has {node!r})"


def absl_flags_parser(prog: str, name: str = "config") -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` with an ml_collections `DEFINE_config_file(name)` flag: the config
    file is loaded (`mm.config.load_config_file`) and every `--name.*` override key checked against it before
    absl parses the flags; those errors, and every flag absl rejects (unknown flag, wrong type), exit with
    `report` (status 2, one line)."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        from mm.config import ConfigError, load_config_file

        cfg = None
        try:
            expanded = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
            spec = _config_spec(expanded, name)
            if spec is not None:
                cfg = load_config_file(spec)
                check_override_keys(cfg, _override_keys(expanded, name))
            return flags.FLAGS(argv)
        except ConfigError as e:
            sys.exit(report(prog, e))
        except flags.Error as e:
            sys.exit(report(prog, _value_error(e, cfg, name)))

    return parse
