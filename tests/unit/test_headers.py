"""ingest/http/headers.py reads a plain header block exactly as the email parser does
(what http.server uses), and leaves every other block to it."""
import http.client
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.http.headers import parse_plain

NAMES = ["Host", "Content-Type", "content-length", "Content-Length", "X-Forwarded-For",
         "Connection", "Expect", "Transfer-Encoding", "Origin", "A_B", "X-", "From"]


def email_parse(lines):
    return http.client.parse_headers(io.BytesIO(b"".join(lines) + b"\r\n"))


def same(lines):
    plain = parse_plain(lines)
    if plain is None:
        return True, None
    message = email_parse(lines)
    assert not message.defects
    assert plain._headers == [(k, v) for k, v in message._headers]
    for name in NAMES + ["missing"]:
        assert plain.get(name) == message.get(name), name
        assert plain.get_all(name) == message.get_all(name), name
        assert plain.get(name, "x") == message.get(name, "x"), name
    assert plain.get_content_type() == message.get_content_type()
    return True, plain


line_values = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255),
                      max_size=20)
lines = st.lists(st.tuples(st.sampled_from(NAMES + ["", " Host", "Bad Name", "\tcont"]),
                           st.sampled_from([":", ": ", ":  \t", "", " :"]),
                           line_values, st.sampled_from(["\r\n", "\n", "\r", ""])),
                 max_size=8)


@settings(max_examples=500, deadline=None)
@given(lines)
def test_plain_blocks_read_as_the_email_parser_reads_them(parts):
    block = [("%s%s%s%s" % p).encode("latin-1") for p in parts]
    assert same(block)[0]


@pytest.mark.parametrize("block, plain", [
    ([b"Host: a\r\n", b"Content-Length: 12\r\n"], True),
    ([b"Host: a\r\n", b" folded\r\n"], False),
    ([b"Host: a\r\n", b"Bad Name: x\r\n"], False),
    ([b"Host: a\x0bb\r\n"], False),
    ([b"Host: a\x85b\r\n"], False),
    ([b"From nobody\r\n"], False),
    ([b"Content-Type: text/html; charset=x \r\n"], True),
    ([b"Content-Length: 1\r\n", b"content-length: 2\r\n"], True),
    ([], True),
])
def test_chosen_blocks(block, plain):
    ok, parsed = same(block)
    assert ok and (parsed is not None) == plain
