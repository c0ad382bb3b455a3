"""Names and references: ``NAME``, ``NAME@VERSION``, ``NAME@ALIAS``."""
from __future__ import annotations

import re
from dataclasses import dataclass

from loradex.hub.errors import InvalidName

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would accept a final newline


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit, no '..'"
        )
    return name


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None   # explicit version number
    alias: str | None = None     # alias name

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(text: str) -> Ref:
    """Parse ``NAME``, ``NAME@3``, ``NAME@v3`` or ``NAME@ALIAS``."""
    if not isinstance(text, str) or text.count("@") > 1:
        raise InvalidName(f"invalid adapter reference {text!r}: expected NAME, NAME@VERSION or NAME@ALIAS")
    name, _, tag = text.partition("@")
    check_name(name, "adapter name")
    if not tag:
        return Ref(name)
    digits = tag[1:] if tag[:1] in "vV" and tag[1:].isdigit() else tag
    if digits.isdigit():
        return Ref(name, version=int(digits))
    check_name(tag, "alias")
    return Ref(name, alias=tag)
