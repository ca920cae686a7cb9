#!/usr/bin/env python3
"""Render deploy/envoy/envoy.yaml (the one Envoy template) from the environment.

    python deploy/envoy/render.py [-o OUT] [NAME=VALUE ...]

The one renderer of the template: `make run` and the tests import it; docker compose
(the one-shot `envoy-config`) and Kubernetes (Envoy's init container) run it with the
agent image's Python into a volume Envoy reads. Precedence: NAME=VALUE arguments,
then environment variables, then the defaults declared in the template's
`# @var NAME=default | meaning` lines. Rules:
- a placeholder is a dollar sign and a declared NAME in braces; an undeclared one is an error;
- lines whose first non-blank character is `#` are copied unchanged;
- lines between `# @if NAME` and `# @endif` are kept only when NAME is on, true, yes or 1; after an
  optional `# @else`, only when it is not (no nesting);
- a template may use the values this file derives from the declared ones (DERIVED below), each
  listed in a `# @derived NAME | meaning` line: lists and URL parts a line of YAML needs.

Only the standard library, so any Python 3.11 runs it. Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "envoy.yaml"
DESCRIPTOR_SET = HERE / "agent.pb"
WEB_ROOT = HERE.parent / "web"  # the chat page; ENVOY_WEB_ROOT outside containers

_VAR = re.compile(r"^# @var ([A-Za-z_][A-Za-z0-9_]*)=(\S*) \| (.+)$")
_DERIVED = re.compile(r"^# @derived ([A-Za-z_][A-Za-z0-9_]*) \| (.+)$")
_ORIGIN = re.compile(r"^https?://[^/\s,*]+$")
_IF = re.compile(r"^# @if ([A-Za-z_][A-Za-z0-9_]*)\s*$")
_ELSE = re.compile(r"^# @else\s*$")
_ENDIF = re.compile(r"^# @endif\s*$")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TRUE = frozenset({"on", "true", "yes", "1"})


class RenderError(ValueError):
    """The template or a value is unusable."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str


def variables(template_text: str | None = None) -> dict[str, Variable]:
    """The variables the template declares, in order."""
    text = TEMPLATE.read_text() if template_text is None else template_text
    found: dict[str, Variable] = {}
    for line in text.splitlines():
        if match := _VAR.match(line):
            name, default, meaning = match.groups()
            found[name] = Variable(name, default, meaning.strip())
    return found


def is_on(value: str) -> bool:
    return value.strip().lower() in _TRUE


def _items(value: str) -> list[str]:
    """A comma-separated value's items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _origins(values: Mapping[str, str]) -> str:
    origins = _items(values["ENVOY_CORS_ORIGINS"])
    bad = [origin for origin in origins if not _ORIGIN.match(origin)]
    if bad:
        raise RenderError(f"ENVOY_CORS_ORIGINS: not an origin (scheme://host[:port]): {', '.join(bad)}")
    return json.dumps([{"exact": origin} for origin in origins])


def _jwks_uri(values: Mapping[str, str]) -> tuple[str, int] | None:
    """The JWKS URI's host and port, or None when the keys come from ENVOY_JWKS_FILE."""
    uri = values["ENVOY_JWKS_URI"].strip()
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme != "https" or not parts.hostname:
        raise RenderError(f"ENVOY_JWKS_URI must be an https:// URL, got {uri!r}")
    return parts.hostname, parts.port or 443


def _jwks_from(source: str) -> Callable[[Mapping[str, str]], str]:
    def derive(values: Mapping[str, str]) -> str:
        remote = _jwks_uri(values) is not None
        return "on" if is_on(values["ENVOY_AUTH"]) and remote == (source == "uri") else "off"

    return derive


# Values computed from the declared variables (NAME -> how), for templates that list them in
# `# @derived` lines: a YAML flow list from a comma-separated value, a URL's parts, conditions.
DERIVED: Mapping[str, Callable[[Mapping[str, str]], str]] = MappingProxyType(
    {
        "ENVOY_JWT_AUDIENCES_LIST": lambda values: json.dumps(_items(values["ENVOY_JWT_AUDIENCES"])),
        "ENVOY_CORS_ORIGIN_MATCHERS": _origins,
        "ENVOY_JWKS_FROM_FILE": _jwks_from("file"),
        "ENVOY_JWKS_FROM_URI": _jwks_from("uri"),
        "ENVOY_JWKS_HOST": lambda values: (_jwks_uri(values) or ("localhost", 443))[0],
        "ENVOY_JWKS_PORT": lambda values: str((_jwks_uri(values) or ("localhost", 443))[1]),
    }
)


def derived_names(template_text: str | None = None) -> dict[str, str]:
    """The derived values a template uses (its `# @derived` lines): name -> meaning."""
    text = TEMPLATE.read_text() if template_text is None else template_text
    return {match.group(1): match.group(2).strip() for line in text.splitlines() if (match := _DERIVED.match(line))}


def render(
    overrides: Mapping[str, str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    template_text: str | None = None,
) -> str:
    """The rendered config. `environ` defaults to os.environ; pass {} for defaults only."""
    text = TEMPLATE.read_text() if template_text is None else template_text
    declared = variables(text)
    env = os.environ if environ is None else environ
    unknown = sorted(set(overrides or {}) - set(declared))
    if unknown:
        raise RenderError(f"not template variables: {', '.join(unknown)}")
    values = {name: (overrides or {}).get(name, env.get(name, var.default)) for name, var in declared.items()}
    for name, value in values.items():
        if "\n" in value or "\r" in value:
            raise RenderError(f"{name} must be a single line")
    for name in derived_names(text):
        if name not in DERIVED:
            raise RenderError(f"@derived {name}: render.py does not compute it")
        try:
            values[name] = DERIVED[name](values)
        except KeyError as missing:
            raise RenderError(f"@derived {name} needs the variable {missing.args[0]}") from None
    declared_or_derived = set(values)

    out: list[str] = []
    condition: str | None = None  # the open @if's variable
    skipping = False
    for number, line in enumerate(text.splitlines(), start=1):
        if match := _IF.match(line):
            if condition is not None:
                raise RenderError(f"line {number}: @if inside the @if {condition} (no nesting)")
            condition = match.group(1)
            if condition not in declared_or_derived:
                raise RenderError(f"line {number}: @if on undeclared variable {condition}")
            skipping = not is_on(values[condition])
            out.append(line)
            continue
        if _ELSE.match(line) or _ENDIF.match(line):
            if condition is None:
                raise RenderError(f"line {number}: {line.strip()} without an @if")
            if _ELSE.match(line):
                skipping = is_on(values[condition])
            else:
                condition, skipping = None, False
            out.append(line)
            continue
        if skipping:
            continue
        if line.lstrip().startswith("#"):
            out.append(line)
            continue

        def substitute(match: re.Match[str], number: int = number) -> str:
            name = match.group(1)
            if name not in declared_or_derived:
                raise RenderError(f"line {number}: undeclared variable {name}")
            return values[name]

        out.append(_PLACEHOLDER.sub(substitute, line))
    if condition is not None:
        raise RenderError(f"the @if {condition} has no @endif")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, help="write here instead of stdout")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("assignments", nargs="*", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    overrides = {}
    for assignment in args.assignments:
        name, sep, value = assignment.partition("=")
        if not sep:
            parser.error(f"expected NAME=VALUE, got {assignment!r}")
        overrides[name] = value
    try:
        config = render(overrides, template_text=args.template.read_text())
        if args.out is None:
            sys.stdout.write(config)
        else:
            args.out.write_text(config)
    except (RenderError, OSError) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
