"""Module-private absl flags for the entry points that share flag names (`--config`, `--out`).

`vljax.evaluate`, `vljax.soup` and `vljax.wise_ft` each define `--config`; defined on absl's global
FLAGS, importing two of them in one process (tests, notebooks) would raise DuplicateFlagError.
Each defines its flags at import on its own `flags.FlagValues()` and runs

    app.run(main, flags_parser=cliflags.parser(_FLAGS))

which, only then, adds them to the global FLAGS beside absl's own (`--verbosity`, `--help`, ...):
one parse, absl's usual errors and exit status, and `--help` lists them. Imports absl only (the
entry points set up host memory before JAX is imported).
"""
from __future__ import annotations

from collections.abc import Callable

from absl import app, flags


def parser(flag_values: flags.FlagValues) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `app.run`: parses argv with `flag_values`' flags and absl's global
    ones (unknown flags, missing required ones and bad values exit 1 with absl's message, as
    `app.run`'s default parser does); returns the remaining argv, as that parser does."""

    def parse(argv: list[str]) -> list[str]:
        for module, module_flags in flag_values.flags_by_module_dict().items():
            for flag in module_flags:  # `--help` lists the main module's flags by module
                flags.FLAGS.register_flag_by_module(module, flag)
        flags.FLAGS.append_flag_values(flag_values)
        for name in list(flag_values):
            flag = flag_values[name]
            # ml_collections' config flag defines its override flags (`--config.x=...`) on the
            # FlagValues it was defined on, during the parse: point it at the one that parses.
            if getattr(flag, "flag_values", None) is flag_values:
                flag.flag_values = flags.FLAGS
        argv = app.parse_flags_with_usage(argv)
        flag_values.mark_as_parsed()  # the same Flag objects: values read through either
        return argv

    return parse
