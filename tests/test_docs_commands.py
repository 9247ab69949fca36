"""The commands and links in README.md and docs/*.md: every ``softmask`` command shown in a fenced code
block parses with the CLI's own parser, its ``key=value`` overrides name real config keys, and every
relative markdown link points to a file that exists. Nothing is run.

Which lines are commands: inside ``` fenced blocks, after joining lines that end with a backslash and
dropping ``# comments`` (as the shell does), a line whose first word is ``softmask``, or one that runs
``-m softmask`` (``torchrun ... -m softmask``, ``python -m softmask``); the words after ``softmask`` are
the arguments. They are parsed as ``softmask.cli.main`` parses them: ``softmask.cli.parse_command_line``
(extra words accepted only as trailing ``key=value`` overrides), then ``refuse_repeated_keys``.
An argparse exit (SystemExit) or a ConfigError fails, naming the file, the line and the command.

Usage synopses are written with placeholders; these rules turn them into commands (and nothing else is
skipped):

- ``[...]`` that opens and closes a word is an optional part: unwrapped when it holds options
  (``[--shards]``, ``[--split val|test]``) or a single ``key=value`` override (``[itm.weight=10]``),
  dropped when it holds prose (``[the row's overrides]``, ``[key=value ...]``). An ``a|b`` choice inside
  an unwrapped part is parsed once with each alternative.
- ``<...>`` that opens and closes a word is prose (``<variant overrides>``) and is dropped.
- A lone ``...`` ("more, as above") is dropped, unless the word before it is an option, whose value it is.
- The word ``TASK`` is parsed once with each downstream task (retrieval, ve, vqa, nlvr2).

Config keys: the overrides are applied with ``load_config`` to the command's ``--config`` file (with
``finetune.task=TASK`` first for ``finetune``/``evaluate TASK``, as the CLI does), or to the built-in
defaults when the command has no config file or names a placeholder that is not a file (``--config C``).
An override whose value is an all-capitals placeholder (``seed=S``, ``softmask.masked_negatives=MN``) is
checked for its key only, against the resolved config.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from softmask.cli import parse_command_line
from softmask.config import FINETUNE_TASKS, ConfigError, load_config, override_key, refuse_repeated_keys, to_dict

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

OPTIONAL = re.compile(r"(?<!\S)\[([^\[\]]*)\](?!\S)")  # [...] opening and closing a word
PROSE = re.compile(r"(?<!\S)<[^<>]*>(?!\S)")  # <...> opening and closing a word
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=\S*$")
PLACEHOLDER_VALUE = re.compile(r"^[A-Z][A-Z0-9_]*$")
CHOICE = "\0"  # marks the words of an unwrapped optional part (for a|b choices)


@dataclass(frozen=True)
class Command:
    page: Path
    line: int  # 1-based line of the command's first line
    text: str  # as shown, continuation lines joined

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(1-based line of the first line inside, lines) of each ``` fenced block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands_of(page: Path) -> list[Command]:
    found = []
    for start, lines in fenced_blocks(page.read_text()):
        i = 0
        while i < len(lines):
            first, joined = i, lines[i]
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            words = joined.split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "softmask" or "-m softmask" in " ".join(words):
                found.append(Command(page, start + first, joined.strip()))
    return found


COMMANDS = [command for page in PAGES for command in commands_of(page)]


def _unwrap(match: re.Match) -> str:
    body = match.group(1).strip()
    if body.startswith("-") or (OVERRIDE.match(body) and body.partition("=")[0] != "key"):
        return " ".join(CHOICE + word for word in body.split())
    return " "


def argument_lists(command: str) -> list[list[str]]:
    """The argument lists after ``softmask`` that a shown command stands for (see the module's rules)."""
    text = PROSE.sub(" ", OPTIONAL.sub(_unwrap, command))
    words = shlex.split(text, comments=True)
    at = next(i for i, w in enumerate(words) if w.lstrip(CHOICE) == "softmask" and
              (i == 0 or words[i - 1] == "-m"))
    words = words[at + 1:]
    options: list[list[str]] = []
    for i, word in enumerate(words):
        if word == "..." and not (i > 0 and words[i - 1].lstrip(CHOICE).startswith("-")):
            continue
        if word.startswith(CHOICE):
            word = word[len(CHOICE):]
            options.append(word.split("|") if "|" in word and not word.startswith("-") else [word])
        elif word == "TASK":
            options.append(list(FINETUNE_TASKS))
        else:
            options.append([word])
    return [list(choice) for choice in itertools.product(*options)]


def parse(argv: list[str]):
    """Parse as ``softmask.cli.main`` does, without running anything."""
    args = parse_command_line(argv)
    refuse_repeated_keys(getattr(args, "overrides", []))
    return args


def has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_overrides(args) -> None:
    """Apply the overrides to the command's config; raises ConfigError naming a key that is wrong."""
    overrides = list(getattr(args, "overrides", None) or [])
    if not overrides:
        return
    config = getattr(args, "config", None)
    path = ROOT / config if config and (ROOT / config).is_file() else None
    if args.command in ("finetune", "evaluate") and args.task in FINETUNE_TASKS:
        overrides = [f"finetune.task={args.task}", *overrides]
    real = [o for o in overrides if not PLACEHOLDER_VALUE.match(o.partition("=")[2])]
    tree = to_dict(load_config(path, real))
    for override in overrides:
        if override not in real and not has_key(tree, override_key(override)):
            raise ConfigError(f"unknown key '{override_key(override)}'")


def test_commands_are_found():
    pages = {command.page.name for command in COMMANDS}
    assert "README.md" in pages and len(pages) >= 5, pages
    assert len(COMMANDS) >= 30, len(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[command.where() for command in COMMANDS])
def test_documented_command_parses(command: Command, capsys):
    lists = argument_lists(command.text)
    assert lists and all(lists), f"{command.where()}: no arguments found in: {command.text}"
    for argv in lists:
        try:
            args = parse(argv)
        except SystemExit:
            message = capsys.readouterr().err.strip().splitlines()
            pytest.fail(f"{command.where()}: does not parse ({message[-1] if message else 'argparse exit'}):\n"
                        f"  {command.text}\n  as: softmask {shlex.join(argv)}", pytrace=False)
        try:
            check_overrides(args)
        except ConfigError as exc:
            pytest.fail(f"{command.where()}: {exc}\n  {command.text}\n  as: softmask {shlex.join(argv)}",
                        pytrace=False)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of each relative link or image outside code blocks and code spans."""
    links, fenced = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        targets = [m.group(1) for m in LINK.finditer(prose)] + [m.group(1) for m in REFERENCE.finditer(prose)]
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor on the same page
            links.append((number, target))
    return links


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_resolve(page: Path):
    missing = [f"{page.relative_to(ROOT)}:{number}: {target}" for number, target in relative_links(page)
               if not (page.parent / target.split("#", 1)[0]).exists()]
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
