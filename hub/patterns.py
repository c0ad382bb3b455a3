"""Matching ``rank_pattern`` / ``alpha_pattern`` keys without running them as backtracking regexes.

A key comes from an adapter's config, so it is data from whoever made the adapter.
PEFT applies it as ``re.match(rf"(.*\\.)?({key})$", module)``; Python's ``re``
backtracks, and a key such as ``(.*.*)*X`` takes exponential time (it froze the
server: ``re`` holds the GIL, so even ``/health`` stalled). Here the key is
parsed by Python's own regex parser, so it means exactly what PEFT reads, and then
run as a Thompson NFA: every position of the module name is visited once with a
set of states, so the time is O(len(name) x states) whatever the key::

    key --re._parser--> syntax tree --build--> NFA (<= MAX_STATES nodes)
    module "model.layers.0.self_attn.q_proj"
            ^     ^      ^ ^         ^      the key may start at 0 or after any "."
    step the state set over the characters; matched when the end is reached in the final state

Only the regular subset is accepted (literals, ``.``, classes, ``|``, groups,
``* + ? {m,n}``, ``^``/``$``); back-references, look-arounds, atomic groups,
possessive repeats and inline flags are refused with :class:`InvalidAdapter`,
as is a key longer than MAX_KEY characters or one that expands past MAX_STATES.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from loradex.hub.errors import InvalidAdapter

try:  # Python 3.11+
    from re import _constants as C
    from re import _parser as P
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse as P  # type: ignore[no-redef]

MAX_KEY = 512        # characters in one pattern key
MAX_STATES = 1024    # NFA nodes one key may expand to (``x{1000}`` copies x a thousand times)
_META = set(".^$*+?{}[]\\|()")

# node kinds
_CHAR, _SPLIT, _BEGIN, _END, _MATCH = range(5)
_MATCH_NODE = 0        # the first node added is the final state
MAX_MOVES = 4096       # memoised steps per key; past it, steps are computed and not kept


class _NFA:
    def __init__(self) -> None:
        self.kind: list[int] = []
        self.test: list = []           # _CHAR: predicate on one character
        self.out: list[list[int]] = []
        self.moves: dict[tuple[frozenset[int], str], frozenset[int]] = {}  # memoised steps (a lazy DFA)

    def step(self, states: frozenset[int], ch: str, entry: int) -> frozenset[int]:
        got = self.moves.get((states, ch))
        if got is None:
            nxt = [self.out[s][0] for s in states if self.kind[s] == _CHAR and self.test[s](ch)]
            if ch == ".":  # the key may also start right after a dot
                nxt.append(entry)
            got = _closure(self, nxt, begin=False, end=False)
            if len(self.moves) < MAX_MOVES:
                self.moves[(states, ch)] = got
        return got

    def add(self, kind: int, test=None, out: list[int] | None = None) -> int:
        if len(self.kind) >= MAX_STATES:
            raise _TooBig()
        self.kind.append(kind)
        self.test.append(test)
        self.out.append(out or [])
        return len(self.kind) - 1


class _TooBig(Exception):
    pass


class _Unsupported(Exception):
    pass


def _category(cat) -> callable:
    tests = {
        C.CATEGORY_DIGIT: lambda ch: unicodedata.category(ch) == "Nd",
        C.CATEGORY_NOT_DIGIT: lambda ch: unicodedata.category(ch) != "Nd",
        C.CATEGORY_SPACE: str.isspace,
        C.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
        C.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
        C.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    }
    if cat not in tests:
        raise _Unsupported(f"class {cat}")
    return tests[cat]


def _char_class(items) -> callable:
    negate = False
    tests = []
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            tests.append(lambda ch, c=chr(av): ch == c)
        elif op is C.RANGE:
            tests.append(lambda ch, lo=av[0], hi=av[1]: lo <= ord(ch) <= hi)
        elif op is C.CATEGORY:
            tests.append(_category(av))
        else:
            raise _Unsupported(str(op))
    return lambda ch: any(t(ch) for t in tests) != negate


def _build(nfa: _NFA, items, nxt: int) -> int:
    """Add ``items`` (a parsed sequence) before node ``nxt``; return the entry node."""
    for op, av in reversed(list(items)):
        nxt = _build_one(nfa, op, av, nxt)
    return nxt


def _build_one(nfa: _NFA, op, av, nxt: int) -> int:
    if op is C.LITERAL:
        return nfa.add(_CHAR, lambda ch, c=chr(av): ch == c, [nxt])
    if op is C.NOT_LITERAL:
        return nfa.add(_CHAR, lambda ch, c=chr(av): ch != c, [nxt])
    if op is C.ANY:
        return nfa.add(_CHAR, lambda ch: ch != "\n", [nxt])
    if op is C.IN:
        return nfa.add(_CHAR, _char_class(av), [nxt])
    if op is C.BRANCH:
        return nfa.add(_SPLIT, None, [_build(nfa, alt, nxt) for alt in av[1]])
    if op is C.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise _Unsupported("inline flags")
        return _build(nfa, sub, nxt)
    if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # greedy or lazy: the same set of matches
        lo, hi, sub = av
        if hi is C.MAXREPEAT or hi == C.MAXREPEAT:
            loop = nfa.add(_SPLIT)
            nfa.out[loop] = [_build(nfa, sub, loop), nxt]
            entry = loop
        else:
            entry = nxt
            for _ in range(hi - lo):  # optional copies: x{2,4} = x x (x (x)?)?
                entry = nfa.add(_SPLIT, None, [_build(nfa, sub, entry), nxt])
        for _ in range(lo):
            entry = _build(nfa, sub, entry)
        return entry
    if op is C.AT:
        if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return nfa.add(_BEGIN, None, [nxt])
        if av in (C.AT_END, C.AT_END_STRING):
            return nfa.add(_END, None, [nxt])
        raise _Unsupported(str(av))
    raise _Unsupported(str(op))  # GROUPREF, ASSERT, ASSERT_NOT, ATOMIC_GROUP, POSSESSIVE_REPEAT, ...


@lru_cache(maxsize=1024)
def _compile(key: str) -> tuple[_NFA, int] | None:
    """(nfa, entry) for a regex key; None for a plain name (matched by string comparison)."""
    if not isinstance(key, str):
        raise InvalidAdapter(f"pattern key {key!r} is not a string")
    if len(key) > MAX_KEY:
        raise InvalidAdapter(f"pattern key of {len(key)} characters; at most {MAX_KEY}")
    if not key or not (_META & set(key)):
        return None
    try:
        parsed = P.parse(key, 0)
    except re.error as exc:
        raise InvalidAdapter(f"pattern key {key!r} is not a valid regular expression ({exc})") from None
    if parsed.state.flags & ~(C.SRE_FLAG_UNICODE):
        raise InvalidAdapter(f"pattern key {key!r}: inline flags are not supported")
    nfa = _NFA()
    try:
        match = nfa.add(_MATCH)
        entry = _build(nfa, parsed, match)
    except _TooBig:
        raise InvalidAdapter(f"pattern key {key!r} is too complex (over {MAX_STATES} states)") from None
    except _Unsupported as exc:
        raise InvalidAdapter(
            f"pattern key {key!r} uses {exc}; only plain regular expressions are supported "
            f"(no back-references, look-arounds, atomic groups, possessive repeats or flags)") from None
    return nfa, entry


def check_pattern(key, *, field: str = "pattern") -> None:
    """InvalidAdapter (naming ``field``) unless ``key`` is a pattern key this module can match safely."""
    try:
        _compile(key)
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{field}: {exc}") from None


def matches(key: str, module: str) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", module)`` (PEFT's rule), in time linear in ``module``."""
    compiled = _compile(key)
    if compiled is None:
        return module == key or module.endswith("." + key)
    nfa, entry = compiled
    if not module:
        return _MATCH_NODE in _closure(nfa, [entry], begin=True, end=True)
    # A key may start at 0 or right after any ".", so a step on "." also re-enters the key.
    # Steps are memoised per (state set, character): module names repeat their characters and
    # structure, so a config's few hundred names cost little more than one.
    current = _closure(nfa, [entry], begin=True, end=False)
    for ch in module:
        current = nfa.step(current, ch, entry)
    return _MATCH_NODE in _closure(nfa, current, begin=False, end=True)


def _closure(nfa: "_NFA", seeds, *, begin: bool, end: bool) -> frozenset[int]:
    """The states reachable from ``seeds`` without reading a character (``^`` holds only at 0, ``$`` only at the end)."""
    seen: set[int] = set()
    stack = list(seeds)
    while stack:
        s = stack.pop()
        if s in seen:
            continue
        kind = nfa.kind[s]
        if kind == _BEGIN and not begin:
            continue
        seen.add(s)
        if kind == _END and not end:
            continue  # kept in the set: the closure at the end of the name passes it
        if kind in (_SPLIT, _BEGIN, _END):
            stack.extend(nfa.out[s])
    return frozenset(seen)
