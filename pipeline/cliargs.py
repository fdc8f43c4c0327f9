"""The argument parser of every ``fpdiff`` command: argparse, whose errors name what was probably
meant -- the nearest option or subcommand (``--num-sample`` -> ``--num-samples``), or the dotted
override a config key takes (``fpdiff train --lr 1e-4`` -> ``training.lr=1e-4``)."""
from __future__ import annotations

import argparse
import difflib
import re
import sys


def nearest(word: str, choices, cutoff: float = 0.6):
    """The choice closest to ``word`` (difflib's ratio >= cutoff), or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def config_key_hint(option: str, value=None, fuzzy: bool = False):
    """``--lr`` -> 'training.lr=VALUE' when a config key is named that (None otherwise)."""
    from pipeline.config_doc import describe  # deferred: config_doc imports this module (a cycle)

    name = option.lstrip("-").split("=", 1)[0].replace("-", "_")
    every = [key for key, _, _ in describe()]
    keys = [key for key in every if key.rsplit(".", 1)[-1] == name or key == name]
    if not keys and fuzzy:  # a misspelt one: --n-step
        close = nearest(name, {key.rsplit(".", 1)[-1]: key for key in every}, cutoff=0.8)
        keys = [key for key in every if close and key.rsplit(".", 1)[-1] == close]
    if not keys:
        return None
    shown = " or ".join(f"{k}={value or 'VALUE'}" for k in keys)
    return f"config keys are dotted overrides: {shown}"


def _options(parser) -> set[str]:
    """The --options of ``parser`` and of its subcommands."""
    out = set()
    for a in parser._actions:
        out.update(o for o in a.option_strings if o.startswith("--"))
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out |= _options(sub)
    return out


class ArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # for the hints of error()
        return super().parse_known_args(args, namespace)

    def _hint(self, word: str):
        given = getattr(self, "_given", [])
        name, _, value = word.partition("=")
        if not value and name in given:
            i = given.index(name)
            value = given[i + 1] if i + 1 < len(given) and not given[i + 1].startswith("-") else ""
        hint = config_key_hint(name, value or None)
        close = nearest(name, [o for o in _options(self) if o != "--help"], cutoff=0.7)
        if not hint and close:
            return f"did you mean {close}?"
        return hint or config_key_hint(name, value or None, fuzzy=True)

    def error(self, message):
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            hints = [f"{w}: {h}" for w in m.group(1).split() if w.startswith("-") for h in [self._hint(w)] if h]
            if hints:
                message += " (" + "; ".join(hints) + ")"
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            close = nearest(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
            if close:
                message += f"; did you mean {close}?"
        super().error(message)
