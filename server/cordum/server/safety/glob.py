"""Topic globs with Go's `path.Match` semantics, as upstream Cordum uses them.

Upstream matches topic patterns (rule `topics`, tenant `allow_topics`/`deny_topics`,
effective-config topic lists) with Go's `path.Match`, so the same policy file must match the
same topics here. `fnmatch` is not a substitute: its `*` crosses `/`, it may case-fold, and
its class and escape syntax differ.

Semantics (ported from Go's `path/match.go`, algorithm included, because Go's chunk-wise
leftmost matching is not the same as a regex translation in corner cases):

- the whole string must match; `*` is any run of characters except `/`; `?` is one character
  except `/`; `[...]` is a class with `a-z` ranges and `^` negation (a class *can* match `/`);
  `\\` escapes the next character; matching is case-sensitive;
- a malformed pattern never matches, and neither does an empty one.

Patterns are compiled once (`compile_glob`) so the common shapes used in policies
(`job.x.y`, `job.x.*`, `*`) skip the general algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

_META = frozenset("*?[\\")


class GlobError(ValueError):
    """The pattern is malformed (Go's `path.ErrBadPattern`)."""


def match(pattern: str, name: str) -> bool:
    """Whether `name` matches `pattern`; malformed or empty patterns never match."""
    try:
        return compile_glob(pattern).match(name)
    except GlobError:
        return False


def validate(pattern: str) -> str | None:
    """`None` when `pattern` is a well-formed non-empty glob, else why it is not."""
    try:
        compile_glob(pattern)
    except GlobError as error:
        return str(error)
    return None


def compile_glob(pattern: str) -> Glob:
    """Compile `pattern`; raises `GlobError` when it is empty or malformed."""
    if pattern == "":
        raise GlobError("empty pattern")
    _check_syntax(pattern)
    if not _META.intersection(pattern):
        return Glob(pattern, _LITERAL, pattern)
    if pattern == "*":
        return Glob(pattern, _STAR, "")
    head = pattern[:-1]
    if pattern.endswith("*") and not _META.intersection(head):
        return Glob(pattern, _PREFIX_STAR, head)
    return Glob(pattern, _GENERAL, "")


_LITERAL, _STAR, _PREFIX_STAR, _GENERAL = range(4)


@dataclass(frozen=True, slots=True)
class Glob:
    pattern: str
    kind: int
    text: str

    def match(self, name: str) -> bool:
        kind = self.kind
        if kind == _LITERAL:
            return name == self.text
        if kind == _PREFIX_STAR:
            return name.startswith(self.text) and "/" not in name[len(self.text) :]
        if kind == _STAR:
            return "/" not in name
        return _match(self.pattern, name)


def _check_syntax(pattern: str) -> None:
    # Go validates the remainder of the pattern when a match fails; running every chunk
    # against the empty string performs exactly that scan.
    rest = pattern
    while rest:
        _star, chunk, rest = _scan_chunk(rest)
        _match_chunk(chunk, "")


def _match(pattern: str, name: str) -> bool:
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and chunk == "":
            # A trailing `*` matches the rest of the name unless it has a `/`.
            return "/" not in name
        rest = _match_chunk(chunk, name)
        # The last chunk must consume the whole name, or a later start might still match.
        if rest is not None and (rest == "" or pattern):
            name = rest
            continue
        if star:
            # Retry the chunk after skipping i+1 characters; `*` cannot skip a `/`.
            matched = False
            for i in range(len(name)):
                if name[i] == "/":
                    break
                rest = _match_chunk(chunk, name[i + 1 :])
                if rest is not None:
                    if not pattern and rest:
                        continue
                    name = rest
                    matched = True
                    break
            if matched:
                continue
        return False
    return name == ""


def _scan_chunk(pattern: str) -> tuple[bool, str, str]:
    star = False
    while pattern and pattern[0] == "*":
        pattern = pattern[1:]
        star = True
    in_range = False
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 < n:
                i += 1
        elif c == "[":
            in_range = True
        elif c == "]":
            in_range = False
        elif c == "*" and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _match_chunk(chunk: str, s: str) -> str | None:
    """What is left of `s` after `chunk` matched its start, or None; raises on bad syntax.

    Like Go, keeps parsing the chunk after a mismatch so syntax errors are always found.
    """
    failed = False
    while chunk:
        if not failed and not s:
            failed = True
        c = chunk[0]
        if c == "[":
            r = ""
            if not failed:
                r = s[0]
                s = s[1:]
            chunk = chunk[1:]
            negated = False
            if chunk and chunk[0] == "^":
                negated = True
                chunk = chunk[1:]
            matched = False
            n_ranges = 0
            while True:
                if chunk and chunk[0] == "]" and n_ranges > 0:
                    chunk = chunk[1:]
                    break
                lo, chunk = _get_esc(chunk)
                hi = lo
                if chunk[0] == "-":
                    hi, chunk = _get_esc(chunk[1:])
                if not failed and lo <= r <= hi:
                    matched = True
                n_ranges += 1
            if matched == negated:
                failed = True
        elif c == "?":
            if not failed:
                if s[0] == "/":
                    failed = True
                s = s[1:]
            chunk = chunk[1:]
        else:
            if c == "\\":
                chunk = chunk[1:]
                if not chunk:
                    raise GlobError("trailing backslash")
            if not failed:
                if chunk[0] != s[0]:
                    failed = True
                s = s[1:]
            chunk = chunk[1:]
    return None if failed else s


def _get_esc(chunk: str) -> tuple[str, str]:
    if not chunk or chunk[0] in "-]":
        raise GlobError("bad character class")
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise GlobError("trailing backslash in character class")
    r, rest = chunk[0], chunk[1:]
    if not rest:
        raise GlobError("unterminated character class")
    return r, rest
