"""Topic globs follow Go's path.Match (upstream's matcher), not fnmatch."""

import pytest

from cordum.server.safety import glob

# Go's own table (src/path/match_test.go). Malformed patterns (ErrBadPattern there) never
# match here.
GO_MATCH_TESTS = [
    ("abc", "abc", True),
    ("*", "abc", True),
    ("*c", "abc", True),
    ("a*", "a", True),
    ("a*", "abc", True),
    ("a*", "ab/c", False),
    ("a*/b", "abc/b", True),
    ("a*/b", "a/c/b", False),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True),
    ("a*b?c*x", "abxbbxdbxebxczzy", False),
    ("ab[c]", "abc", True),
    ("ab[b-d]", "abc", True),
    ("ab[e-g]", "abc", False),
    ("ab[^c]", "abc", False),
    ("ab[^b-d]", "abc", False),
    ("ab[^e-g]", "abc", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "ab", False),
    ("a?b", "a☺b", True),
    ("a[^a]b", "a☺b", True),
    ("a???b", "a☺b", False),
    ("a[^a][^a][^a]b", "a☺b", False),
    ("[a-ζ]*", "α", True),  # noqa: RUF001 - Go's table uses Greek letters on purpose
    ("*[a-ζ]", "A", False),
    ("a?b", "a/b", False),
    ("a*b", "a/b", False),
    ("[\\]a]", "]", True),
    ("[\\-]", "-", True),
    ("[x\\-]", "x", True),
    ("[x\\-]", "-", True),
    ("[x\\-]", "z", False),
    ("[\\-x]", "x", True),
    ("[\\-x]", "-", True),
    ("[\\-x]", "a", False),
    ("*x", "xxx", True),
]

GO_BAD_PATTERNS = [
    ("[]a]", "]"),
    ("[-]", "-"),
    ("[x-]", "x"),
    ("[x-]", "-"),
    ("[x-]", "z"),
    ("[-x]", "x"),
    ("[-x]", "-"),
    ("[-x]", "a"),
    ("\\", "a"),
    ("[a-b-c]", "a"),
    ("[", "a"),
    ("[^", "a"),
    ("[^bc", "a"),
    ("a[", "a"),
    ("a[", "ab"),
    ("a[", "x"),
    ("a/b[", "x"),
    # Go reports the bad pattern even when an earlier part already matched everything.
    ("*x[", "x"),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), GO_MATCH_TESTS)
def test_go_path_match_table(pattern: str, name: str, expected: bool) -> None:
    assert glob.match(pattern, name) is expected


@pytest.mark.parametrize(("pattern", "name"), GO_BAD_PATTERNS)
def test_malformed_patterns_never_match_and_are_reported(pattern: str, name: str) -> None:
    assert glob.match(pattern, name) is False
    assert glob.validate(pattern) is not None
    with pytest.raises(glob.GlobError):
        glob.compile_glob(pattern)


def test_empty_pattern_never_matches() -> None:
    assert glob.match("", "") is False
    assert glob.match("", "job.a") is False
    assert glob.validate("") == "empty pattern"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # Dots are not separators: `*` spans them (a classic surprise, kept for compatibility).
        ("job.*", "job.a.b.c", True),
        ("job.*", "job.", True),
        ("job.*", "job", False),
        ("job.*", "job.a/b", False),
        ("job.sre.*", "job.sre.restart", True),
        ("job.sre.*", "job.srex.restart", False),
        # Case-sensitive, unlike fnmatch on some platforms.
        ("job.A", "job.a", False),
        ("job.a", "job.a", True),
        ("*", "job.a", True),
        ("*", "a/b", False),
        ("**", "abc", True),
        ("job.*.run", "job.x.y.run", True),
        ("job.?", "job.ab", False),
        # fnmatch would read `[!a]` as negation; Go reads `!` as a literal class member.
        ("job.[!a]", "job.b", False),
        ("job.[!a]", "job.!", True),
    ],
)
def test_topic_shapes_and_fast_paths(pattern: str, name: str, expected: bool) -> None:
    assert glob.match(pattern, name) is expected
    assert glob.compile_glob(pattern).match(name) is expected


def test_fast_paths_are_chosen_for_common_shapes() -> None:
    assert glob.compile_glob("job.a.b").kind == 0  # literal
    assert glob.compile_glob("*").kind == 1
    assert glob.compile_glob("job.*").kind == 2
    assert glob.compile_glob("job.*.x").kind == 3
    assert glob.compile_glob("job\\*").kind == 3
