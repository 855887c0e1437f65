"""The WSGI app end to end, in-process: paths, methods, where parameters travel, every
answer format, limits, credentials, client IP, queue items and malformed input.

The rules are issue 3 (and issue 8's malformed inputs) over mixpanel-api.md sections 1-3.
Every call goes through golden.harness.call, which also checks the invariants of every
response (no 500, Content-Length, Cache-Control, CORS echo) under wsgiref.validate.
"""
import ipaddress
import json
import struct

import pytest

from ingest.http.app import AppState
from testkit.payloads import b64, basic_auth

from .golden.harness import NOW, NOW_MS, call, form, gz, make, qs

ORIGIN = "http://shop.example"
FORM = "application/x-www-form-urlencoded"


def ev(token="tok", **props):
    props["token"] = token
    return {"event": "Signed Up", "properties": props}


def item(record, time=round(NOW, 3), ip=None):
    """The queue item a /track record becomes (DESIGN.md record contract)."""
    props = dict(record["properties"])
    props.setdefault("time", time)
    props["mp_processing_time_ms"] = NOW_MS
    if ip is not None:
        props.setdefault("ip", ip)
    out = dict(record, properties=props)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def get(app, data=None, path="/track", headers=None, raw=None, **params):
    fields = {}
    if data is not None:
        fields["data"] = data if isinstance(data, str) else json.dumps(data)
    fields.update(params)
    query = qs(**fields) if raw is None else raw
    return call(app, "GET", path, query, headers=dict({"Origin": ORIGIN}, **(headers or {})))


def post(app, body, path="/track", query="", ctype=FORM, headers=None, **kw):
    return call(app, "POST", path, query, body, ctype,
                headers=dict({"Origin": ORIGIN}, **(headers or {})), **kw)


@pytest.fixture
def app_sink():
    return make()


# ---- paths and methods ---------------------------------------------------------------------

@pytest.mark.parametrize("path, queue", [
    ("/track", "events"), ("/track/", "events"), ("/prefix/track", "events"),
    ("/a/b/track/", "events"), ("/engage", "people"), ("/engage/", "people"),
    ("/x/engage", "people"), ("/groups", "groups"), ("/groups/", "groups"),
    ("/p/groups/", "groups")])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_endpoints_any_prefix_trailing_slash_get_and_post(path, queue, method):
    app, sink = make()
    if "track" in path:
        record = ev()
    elif "engage" in path:
        record = {"$token": "tok", "$distinct_id": "u", "$set": {"a": 1}}
    else:
        record = {"$token": "tok", "$group_key": "k", "$group_id": "g", "$set": {"a": 1}}
    if method == "GET":
        r = get(app, record, path=path)
    else:
        r = post(app, form(data=json.dumps(record)), path=path)
    assert (r.status, r.body) == (200, b"1")
    assert [q for q, _ in sink.items] == [queue]


@pytest.mark.parametrize("path", ["/", "/trackx", "/track/x", "/decide/", "/record/",
                                  "/tracks", "/flags", "/favicon.ico", "/import/extra"])
def test_other_paths_are_404_with_a_short_json_error(path):
    app, sink = make()
    r = get(app, ev(), path=path)
    assert r.status == 404
    assert r.headers["content-type"] == "application/json"
    body = json.loads(r.body)
    assert body["status"] == 0 and isinstance(body["error"], str) and len(r.body) < 200
    assert sink.items == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(method):
    app, sink = make()
    r = call(app, method, "/track", qs(data=json.dumps(ev())), headers={"Origin": ORIGIN})
    assert r.status == 405
    assert "POST" in r.headers["allow"] and "GET" in r.headers["allow"]
    assert sink.items == []


@pytest.mark.parametrize("path", ["/track", "/engage/", "/p/groups", "/import"])
def test_options_preflight(path):
    app, sink = make()
    r = call(app, "OPTIONS", path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-custom, authorization"})
    assert r.status == 204 and r.body == b""
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "OPTIONS"} <= methods
    assert r.headers["access-control-allow-headers"] == "content-type, x-custom, authorization"
    assert int(r.headers["access-control-max-age"]) > 0
    assert sink.items == []


def test_preflight_does_not_echo_a_hostile_header_list():
    app, _ = make()
    r = call(app, "OPTIONS", "/track", headers={
        "Origin": ORIGIN, "Access-Control-Request-Headers": "x-a, <script>alert(1)</script>"})
    assert r.status == 204
    assert "<script>" not in r.headers.get("access-control-allow-headers", "")


# ---- where data and control parameters travel ----------------------------------------------

def test_data_in_query_string(app_sink):
    app, sink = app_sink
    assert get(app, ev(plan="pro")).body == b"1"
    assert sink.items == [("events", item(ev(plan="pro")))]


def test_python_form_post_with_verbose_in_body(app_sink):
    app, sink = app_sink
    r = post(app, form(data=json.dumps(ev(x="a b+c")), verbose=1, ip=0))
    assert r.body == b'{"status": 1, "error": null}'
    assert r.headers["content-type"] == "application/json"
    assert sink.items == [("events", item(ev(x="a b+c")))]


def test_sendbeacon_text_plain_body(app_sink):
    app, sink = app_sink
    r = post(app, form(data=b64(json.dumps([ev()]))), query="ip=0&_=1",
             ctype="text/plain;charset=UTF-8")
    assert r.body == b"1" and sink.items == [("events", item(ev()))]


def test_json_body(app_sink):
    app, sink = app_sink
    r = post(app, json.dumps([ev(), ev(n=2)]).encode(), query="verbose=1",
             ctype="application/json")
    assert json.loads(r.body) == {"status": 1, "error": None}
    assert sink.items == [("events", item(ev())), ("events", item(ev(n=2)))]


def test_body_control_parameters_win_over_query(app_sink):
    app, _ = app_sink
    r = post(app, form(data=json.dumps(ev()), verbose=1), query="verbose=0")
    assert r.headers["content-type"] == "application/json"
    r = post(app, form(data=json.dumps(ev()), verbose=0), query="verbose=1")
    assert r.body == b"1"


@pytest.mark.parametrize("urlsafe", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_base64_data_in_query(urlsafe, pad):
    app, sink = make()
    record = ev(x="~~~>>>???", y="é")
    assert get(app, b64(json.dumps(record), urlsafe, pad)).body == b"1"
    assert sink.items == [("events", item(record))]


def test_node_unescaped_base64_post_body_is_repaired(app_sink):
    app, sink = app_sink
    records = [ev(x="~~~>>>???"), ev(x="???>>>~~~")]
    encoded = b64(json.dumps(records))
    assert "+" in encoded and "/" in encoded
    r = post(app, ("data=" + encoded).encode(), query="ip=0&verbose=0")
    assert r.body == b"1"
    assert sink.items == [("events", item(records[0])), ("events", item(records[1]))]


def test_raw_json_value_keeps_its_literal_space(app_sink):
    app, sink = app_sink
    record = ev(x="two  spaces and+plus")
    r = call(app, "GET", "/track",
             "data=" + json.dumps(record).replace(" ", "%20").replace("+", "%2B"))
    assert r.body == b"1" and sink.items == [("events", item(record))]


# ---- answers -------------------------------------------------------------------------------

def test_plain_answers_have_no_newline(app_sink):
    app, _ = app_sink
    ok, bad = get(app, ev()), get(app, {"event": "x"})
    assert (ok.status, ok.body, bad.status, bad.body) == (200, b"1", 200, b"0")
    assert ok.headers["content-type"].startswith("text/plain")
    assert bad.headers["content-type"].startswith("text/plain")


def test_verbose_error_names_record_index_and_field(app_sink):
    app, sink = app_sink
    batch = [ev(), ev(), ev(), {"event": "e", "properties": {}}]
    r = get(app, batch, verbose=1)
    assert json.loads(r.body) == {"status": 1, "error": "record 3: properties.token is missing"}
    assert len(sink.items) == 3
    r = get(app, [{"event": "e", "properties": {}}], verbose=1)
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert json.loads(r.body) == {"status": 0, "error": "record 0: properties.token is missing"}


CALLBACKS = ["fn", "a.b.c", "_x$1", "$", "jQuery123_456"]


@pytest.mark.parametrize("callback", CALLBACKS)
def test_callback_wraps_the_plain_answer(callback):
    app, _ = make()
    r = get(app, ev(), callback=callback)
    assert (r.status, r.body) == (200, callback.encode() + b"(1)")
    assert r.headers["content-type"].startswith("text/javascript")
    r = get(app, "garbage", callback=callback)
    assert r.body == callback.encode() + b"(0)"


@pytest.mark.parametrize("callback", CALLBACKS)
def test_callback_wraps_the_verbose_answer(callback):
    app, _ = make()
    r = get(app, ev(), callback=callback, verbose=1)
    assert r.status == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.body.startswith(callback.encode() + b"(") and r.body.endswith(b")")
    assert json.loads(r.body[len(callback) + 1:-1]) == {"status": 1, "error": None}


@pytest.mark.parametrize("callback", ["alert(1)", "a b", "<script>x</script>", "a..b", "1abc",
                                      "x;y", "a.", ".a", "a-b", "é", "a" * 200,
                                      "(function(){})"])
def test_bad_callback_is_refused_and_not_echoed(callback):
    app, sink = make()
    r = get(app, ev(), callback=callback)
    assert r.status == 400
    assert callback.encode("utf-8") not in r.body
    assert sink.items == []


def test_img_answers_a_1x1_gif(app_sink):
    app, sink = app_sink
    for data in (ev(), "garbage"):
        r = get(app, data, img=1)
        assert r.status == 200 and r.headers["content-type"] == "image/gif"
        assert r.body[:6] in (b"GIF87a", b"GIF89a")
        assert struct.unpack("<HH", r.body[6:10]) == (1, 1)
    assert len(sink.items) == 1


@pytest.mark.parametrize("url", ["http://example.com/thanks?a=1&b=2", "https://x.example/",
                                 "HTTPS://X.EXAMPLE/path"])
def test_redirect(url):
    app, sink = make()
    r = get(app, ev(), redirect=url)
    assert r.status == 302 and r.headers["location"] == url
    assert len(sink.items) == 1


@pytest.mark.parametrize("url", ["javascript:alert(1)", "data:text/html,<b>x</b>", "//evil.com",
                                 "/local", "ftp://x.example/", "http://a\r\nSet-Cookie: x=1",
                                 "http://a\nb", "http:evil.com", "https:/\\evil.com",
                                 "\thttp://x.example"])
def test_bad_redirect_is_refused_and_not_echoed(url):
    app, sink = make()
    r = get(app, ev(), redirect=url)
    assert r.status == 400 and "location" not in r.headers
    assert url.encode() not in r.body
    assert sink.items == []


@pytest.mark.parametrize("url", ["http://example.com/\u4e2d", "http://example.com/\x01x",
                                 "http://example.com/\x7f"])
def test_redirect_with_unencodable_characters_is_refused(url):
    app, _ = make()
    r = get(app, ev(), redirect=url)
    assert r.status == 400 and "location" not in r.headers


def test_accepted_and_rejected_requests_are_both_200(app_sink):
    app, _ = app_sink
    for data in (ev(), {"event": 1}, "garbage", "[]", "{}"):
        assert get(app, data).status == 200


def test_sink_unavailable_is_503_with_retry_after(app_sink):
    app, sink = app_sink
    sink.failing = True
    r = get(app, ev(), verbose=1)
    assert r.status == 503 and int(r.headers["retry-after"]) >= 1
    assert json.loads(r.body)["status"] == 0
    assert sink.items == []


def test_nothing_accepted_does_not_touch_the_sink(app_sink):
    app, sink = app_sink
    sink.failing = True
    assert get(app, {"event": "x"}).body == b"0"


def test_too_many_requests_in_flight_is_503():
    app, sink = make(state=_busy_state(), max_in_flight=3)
    r = get(app, ev())
    assert r.status == 503 and "retry-after" in r.headers and sink.items == []


def _busy_state():
    state = AppState()
    state.in_flight = 3
    return state


# ---- limits ---------------------------------------------------------------------------------

def test_2000_records_pass_and_2001_is_413():
    app, sink = make()
    record = {"event": "e", "properties": {"token": "t", "time": NOW}}
    assert post(app, form(data=json.dumps([record] * 2000))).body == b"1"
    assert len(sink.queue("events")) == 2000
    r = post(app, form(data=json.dumps([record] * 2001)))
    assert r.status == 413 and len(sink.items) == 2000


def test_body_over_max_body_bytes_is_413():
    app, sink = make(max_body_bytes=1000)
    r = post(app, form(data=json.dumps(ev(pad="x" * 2000))))
    assert r.status == 413 and sink.items == []
    assert post(app, form(data=json.dumps(ev(pad="x" * 100)))).body == b"1"


def test_chunked_body_over_the_limit_is_413():
    app, sink = make(max_body_bytes=1000)
    r = post(app, form(data=json.dumps(ev(pad="x" * 2000))), content_length=False,
             headers={"Transfer-Encoding": "chunked"})
    assert r.status == 413 and sink.items == []


def test_record_over_max_record_bytes_is_rejected_alone():
    app, sink = make(max_record_bytes=300)
    big, small = ev(pad="x" * 400), ev(n=1)
    r = get(app, [big, small], verbose=1)
    assert json.loads(r.body) == {"status": 1, "error": "record 0: record exceeds 300 bytes"}
    assert sink.items == [("events", item(small))]


def test_properties_over_max_properties_rejected_alone():
    app, sink = make(max_properties=3)
    many, few = ev(a=1, b=2, c=3), ev(a=1, b=2)
    r = get(app, [few, many], verbose=1)
    body = json.loads(r.body)
    assert body["status"] == 1 and body["error"].startswith("record 1: ")
    assert sink.items == [("events", item(few))]


def test_gzip_body_is_accepted(app_sink):
    app, sink = app_sink
    r = post(app, gz(form(data=json.dumps([ev(), ev(n=2)]))),
             headers={"Content-Encoding": "gzip"})
    assert r.body == b"1" and len(sink.items) == 2


def test_gzip_bomb_is_413():
    app, sink = make(max_body_bytes=100_000)
    bomb = gz(b"data=" + b"A" * 5_000_000)
    assert len(bomb) < 100_000
    r = post(app, bomb, headers={"Content-Encoding": "gzip"})
    assert r.status == 413 and sink.items == []


@pytest.mark.parametrize("mangle", [lambda b: b[:len(b) // 2], lambda b: b[:10] + b"\x00" * 40,
                                    lambda b: b"not gzip at all"])
def test_broken_gzip_is_400(mangle):
    app, sink = make()
    r = post(app, mangle(gz(form(data=json.dumps(ev())))), headers={"Content-Encoding": "gzip"})
    assert r.status == 400 and sink.items == []


def test_unknown_content_encoding_is_415(app_sink):
    app, sink = app_sink
    r = post(app, form(data=json.dumps(ev())), headers={"Content-Encoding": "br"})
    assert r.status == 415 and sink.items == []


def test_unsupported_content_type_is_415(app_sink):
    app, sink = app_sink
    r = post(app, form(data=json.dumps(ev())), ctype="application/octet-stream")
    assert r.status == 415 and sink.items == []


def test_body_shorter_than_content_length_is_400(app_sink):
    app, sink = app_sink
    env_body = form(data=json.dumps(ev()))
    r = post(app, env_body, headers={"Content-Length": str(len(env_body) + 50)})
    assert r.status == 400 and sink.items == []


# ---- client IP -------------------------------------------------------------------------------

def test_ip_1_uses_the_peer_address(app_sink):
    app, sink = app_sink
    r = call(app, "GET", "/track", qs(data=json.dumps(ev()), ip=1), remote="203.0.113.7",
             headers={"X-Forwarded-For": "198.51.100.1"})
    assert r.body == b"1"
    assert sink.items == [("events", item(ev(), ip="203.0.113.7"))]   # peer not trusted


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.9.9.9", "::1"])
def test_ip_1_behind_a_trusted_proxy_uses_leftmost_forwarded_for(peer):
    app, sink = make()
    call(app, "GET", "/track", qs(data=json.dumps(ev()), ip=1), remote=peer,
         headers={"X-Forwarded-For": "198.51.100.1, 10.0.0.2, 127.0.0.1"})
    assert sink.items == [("events", item(ev(), ip="198.51.100.1"))]


def test_trusted_proxies_setting_is_honoured():
    app, sink = make(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    call(app, "GET", "/track", qs(data=json.dumps(ev()), ip=1), remote="10.1.2.3",
         headers={"X-Forwarded-For": "198.51.100.1"})
    call(app, "GET", "/track", qs(data=json.dumps(ev()), ip=1), remote="127.0.0.1",
         headers={"X-Forwarded-For": "198.51.100.1"})
    assert sink.items == [("events", item(ev(), ip="198.51.100.1")),
                          ("events", item(ev(), ip="127.0.0.1"))]


def test_ip_1_from_the_body_and_explicit_ip_wins(app_sink):
    app, sink = app_sink
    post(app, form(data=json.dumps([ev(), ev(ip="192.0.2.5"), ev(ip=0)]), ip=1),
         remote="203.0.113.7")
    assert sink.items == [("events", item(ev(), ip="203.0.113.7")),
                          ("events", item(ev(ip="192.0.2.5"))), ("events", item(ev(ip=0)))]


def test_unparsable_forwarded_for_from_a_trusted_proxy_falls_back_to_the_peer(app_sink):
    app, sink = app_sink
    call(app, "GET", "/track", qs(data=json.dumps(ev()), ip=1), remote="127.0.0.1",
         headers={"X-Forwarded-For": "unknown, 198.51.100.1"})
    assert sink.items == [("events", item(ev(), ip="127.0.0.1"))]


def test_test_parameter_is_accepted_and_ignored(app_sink):
    app, sink = app_sink
    assert get(app, ev(), test=1).body == b"1" and len(sink.items) == 1


def test_ip_0_adds_nothing(app_sink):
    app, sink = app_sink
    get(app, ev(), ip=0)
    assert sink.items == [("events", item(ev()))]


def test_engage_and_groups_get_dollar_ip_with_ip_1(app_sink):
    app, sink = app_sink
    people = [{"$token": "t", "$distinct_id": "u", "$set": {"a": 1}},
              {"$token": "t", "$distinct_id": "u", "$unset": ["a"], "$ip": "0"}]
    call(app, "GET", "/engage", qs(data=json.dumps(people), ip=1), remote="203.0.113.7")
    call(app, "GET", "/groups", qs(data=json.dumps(
        {"$token": "t", "$group_key": "k", "$group_id": 7, "$delete": ""}), ip=1),
        remote="203.0.113.7")
    assert [(q, json.loads(p)) for q, p in sink.items] == [
        ("people", dict(people[0], **{"$ip": "203.0.113.7"})), ("people", people[1]),
        ("groups", {"$token": "t", "$group_key": "k", "$group_id": 7, "$delete": "",
                    "$ip": "203.0.113.7"})]


def test_engage_modifiers_are_kept_byte_for_byte(app_sink):
    app, sink = app_sink
    record = {"$token": "t", "$distinct_id": "u", "$set": {"é": "ü"}, "$time": 1799999999.5,
              "$ignore_time": True, "$ignore_alias": False}
    get(app, record, path="/engage/")
    assert sink.items == [("people", json.dumps(record, separators=(",", ":"),
                                                ensure_ascii=False).encode())]


# ---- /import --------------------------------------------------------------------------------

ROUTES = {"secrets": {"tok": "s3cret", "other": "different"}, "blocked_tokens": ["blk"]}


def imp(token="tok", **props):
    base = {"time": NOW - 40 * 86400, "distinct_id": "u1", "$insert_id": "id-%s" % token}
    base.update(props)
    return ev(token, **base)


def imp_item(record):
    return item(record)


def import_post(app, records, query="", auth=None, **fields):
    headers = {"Authorization": auth} if auth else {}
    return post(app, form(data=json.dumps(records), **fields), path="/import", query=query,
                headers=headers)


@pytest.mark.parametrize("how", ["basic_secret", "api_key_body", "api_key_query",
                                 "service_account"])
def test_import_credentials(how):
    app, sink = make(ROUTES)
    if how == "basic_secret":
        r = import_post(app, [imp()], auth=basic_auth("s3cret"), verbose=1)
    elif how == "api_key_body":
        r = import_post(app, [imp()], verbose=1, api_key="s3cret")
    elif how == "api_key_query":
        r = import_post(app, [imp()], query="api_key=s3cret&verbose=1")
    else:
        r = import_post(app, [imp()], query="project_id=123",
                        auth=basic_auth("sa.user", "s3cret"), verbose=1)
    assert (r.status, json.loads(r.body)) == (200, {"status": 1, "error": None})
    assert sink.items == [("imports", imp_item(imp()))]


@pytest.mark.parametrize("auth, key", [(None, None), (basic_auth("wrong"), None),
                                       (None, "wrong"), ("Bearer s3cret", None),
                                       ("Basic !!!", None), (basic_auth("", ""), None)])
def test_import_without_valid_credentials_is_401(auth, key):
    app, sink = make(ROUTES)
    fields = {"api_key": key} if key else {}
    r = import_post(app, [imp()], auth=auth, verbose=1, **fields)
    assert r.status == 401 and r.headers["content-type"] == "application/json"
    assert json.loads(r.body)["status"] == 0 and sink.items == []


def test_import_401_in_strict_shape():
    app, _ = make(ROUTES)
    r = import_post(app, [imp()], query="strict=1")
    assert r.status == 401
    assert json.loads(r.body) == {"code": 401, "error": "Invalid credentials",
                                  "status": "Unauthorized"}


def test_import_python_legacy_secret_with_api_key_in_body():
    app, sink = make(ROUTES)
    r = import_post(app, [imp()], auth=basic_auth("s3cret"), verbose=1, ip=0,
                    api_key="project-api-key")
    assert (r.status, json.loads(r.body)) == (200, {"status": 1, "error": None})
    assert sink.items == [("imports", imp_item(imp()))]


def test_import_strict_all_good():
    app, sink = make(ROUTES)
    r = import_post(app, [imp(), imp(**{"$insert_id": "b"})], query="strict=1",
                    auth=basic_auth("s3cret"))
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert json.loads(r.body) == {"code": 200, "num_records_imported": 2, "status": "OK"}
    assert len(sink.items) == 2


def test_import_strict_reports_failed_records_and_queues_the_rest():
    app, sink = make(ROUTES)
    good = imp()
    records = [good, imp(**{"$insert_id": "no-time", "time": None}), imp("other"), "junk",
               imp(time=10), imp(time=NOW + 7200, **{"$insert_id": "future"})]
    del records[1]["properties"]["time"]
    r = import_post(app, records, query="strict=1", auth=basic_auth("s3cret"))
    assert r.status == 400
    body = json.loads(r.body)
    assert body["code"] == 400 and body["num_records_imported"] == 1
    assert [(f["index"], f["$insert_id"], f["field"]) for f in body["failed_records"]] == [
        (1, "no-time", "properties.time"), (2, "id-other", "properties.token"),
        (3, None, "record"), (4, "id-tok", "properties.time"),
        (5, "future", "properties.time")]
    assert all(isinstance(f["message"], str) and f["message"] for f in body["failed_records"])
    assert sink.items == [("imports", imp_item(good))]


def test_import_strict_too_many_records_is_413_in_strict_shape():
    app, sink = make(ROUTES, max_records=2)
    r = import_post(app, [imp(), imp(), imp()], query="strict=1", auth=basic_auth("s3cret"))
    assert r.status == 413
    body = json.loads(r.body)
    assert body["code"] == 413 and isinstance(body["error"], str) and sink.items == []


def test_import_token_with_another_secret_is_rejected():
    app, sink = make(ROUTES)
    r = import_post(app, [imp("other"), imp()], auth=basic_auth("s3cret"), verbose=1)
    assert json.loads(r.body) == {"status": 1, "error": "record 0: credentials are not valid "
                                                        "for this token"}
    assert sink.items == [("imports", imp_item(imp()))]


def test_import_without_strict_answers_like_track():
    app, sink = make(ROUTES)
    assert import_post(app, [imp()], auth=basic_auth("s3cret")).body == b"1"
    assert import_post(app, [{"event": "x"}], auth=basic_auth("s3cret")).body == b"0"
    old = imp(time=1_000_000_000)           # years old: fine on /import
    assert import_post(app, [old], auth=basic_auth("s3cret")).body == b"1"
    assert sink.items[-1] == ("imports", imp_item(old))


def test_import_strict_undecodable_data_is_400():
    app, sink = make(ROUTES)
    r = post(app, b"data=%25%25garbage", path="/import", query="strict=1",
             headers={"Authorization": basic_auth("s3cret")})
    assert r.status == 400 and json.loads(r.body)["code"] == 400


def test_track_ignores_credentials(app_sink):
    app, sink = app_sink
    r = post(app, form(data=json.dumps(ev()), api_key="nonsense"),
             headers={"Authorization": basic_auth("nonsense")})
    assert r.body == b"1" and len(sink.items) == 1


# ---- queue items -----------------------------------------------------------------------------

def test_items_are_compact_utf8_json_in_order(app_sink):
    app, sink = app_sink
    records = [ev(name="Zoë", emoji="😀", n=1), ev(name="中文", n=2)]
    get(app, records)
    assert [q for q, _ in sink.items] == ["events", "events"]
    first = sink.items[0][1]
    assert "Zoë".encode() in first and "😀".encode() in first and b"\\u" not in first
    assert b", " not in first and b": " not in first
    assert [p for _, p in sink.items] == [item(records[0]), item(records[1])]


def test_blocked_tokens_are_answered_as_accepted_but_not_queued():
    app, sink = make(ROUTES)
    assert get(app, ev("blk")).body == b"1"
    assert get(app, [ev("blk"), ev()], verbose=1).body == b'{"status": 1, "error": null}'
    assert sink.items == [("events", item(ev()))]


def test_routes_queue_overrides_are_used():
    app, sink = make({"queues": {"track": "ev2"}, "tokens": {"vip": {"track": "vip_events"}}})
    get(app, [ev(), ev("vip")])
    assert [q for q, _ in sink.items] == ["ev2", "vip_events"]


def test_missing_time_filled_ms_converted_processing_time_added(app_sink):
    app, sink = app_sink
    get(app, [ev(), ev(time=1_799_999_000_500), ev(time=NOW + 9999)])
    props = [json.loads(p)["properties"] for _, p in sink.items]
    assert [p["time"] for p in props] == [1_800_000_000.123, 1_799_999_000.5, 1_800_000_000.123]
    assert {p["mp_processing_time_ms"] for p in props} == {1_800_000_000_123}


def test_events_older_than_five_days_rejected_others_pass(app_sink):
    app, sink = app_sink
    r = get(app, [ev(time=NOW - 6 * 86400), ev(time=NOW - 4 * 86400)], verbose=1)
    assert json.loads(r.body) == {"status": 1, "error": "record 0: properties.time is more "
                                                        "than 5 days old (use /import)"}
    assert len(sink.items) == 1


# ---- malformed input (issue 8) ---------------------------------------------------------------

SECRET_MARK = "ZZ<marker>ZZ"


@pytest.mark.parametrize("query", [
    "data=" + SECRET_MARK, "data=%FF%FE" + SECRET_MARK, "data=%7B" + SECRET_MARK,
    "data=" + b64('{"event":"' + SECRET_MARK), "data=" + b64("[" + SECRET_MARK + "]"),
    "data=", "", "data=123", "data=%22" + SECRET_MARK + "%22", "data=null", "data=NaN",
    "data=%7B%22x%22%3ANaN%7D", "data=%5BInfinity%5D", "data=%5B-Infinity%5D",
    "data=%7B%22x%22%3A1" + "0" * 5000 + "%7D", "data=%5B1%2C2%5D",
    "data=" + "%5B" * 100_000, "data=" + "%7B%22a%22%3A" * 50_000,
    "verbose=1&data=%5B%7B%22event%22%3A%22" + SECRET_MARK + "%22%7D%5D",
    "data=%7B%22event%22%3A%22%ED%A0%80" + SECRET_MARK + "%22%7D",
])
@pytest.mark.parametrize("verbose", ["0", "1"])
def test_malformed_data_gets_a_clean_answer_without_echo(query, verbose):
    app, sink = make()
    r = call(app, "GET", "/track", query + "&verbose=" + verbose, headers={"Origin": ORIGIN})
    assert r.status in (200, 400)
    if r.status == 200 and verbose == "0":
        assert r.body == b"0"
    if verbose == "1" or r.status == 400:
        assert json.loads(r.body)["status"] == 0
    assert SECRET_MARK.encode() not in r.body and sink.items == []


def test_invalid_utf8_body_is_zero(app_sink):
    app, sink = app_sink
    r = post(app, b"data=" + b'{"event":"\xff\xfe"}')
    assert (r.status, r.body, sink.items) == (200, b"0", [])


def test_invalid_utf8_body_still_honours_verbose_from_the_query(app_sink):
    app, sink = app_sink
    r = post(app, b"data=" + b'{"event":"\xff\xfe"}', query="verbose=1")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert json.loads(r.body)["status"] == 0 and sink.items == []


def test_lone_surrogate_rejects_only_its_record(app_sink):
    app, sink = app_sink
    text = '[{"event":"bad\\ud800","properties":{"token":"t"}},' \
           '{"event":"ok","properties":{"token":"t","\\udfff":1}},' \
           '{"event":"fine \\ud83d\\ude00","properties":{"token":"t"}}]'
    r = call(app, "GET", "/track", qs(data=text, verbose=1))
    assert json.loads(r.body)["status"] == 1
    assert json.loads(r.body)["error"].startswith("record 0: ")
    assert [json.loads(p)["event"] for _, p in sink.items] == ["fine 😀"]
    assert "😀".encode() in sink.items[0][1]


def test_all_records_with_lone_surrogates_is_zero(app_sink):
    app, sink = app_sink
    r = call(app, "GET", "/track", qs(data='{"event":"\\ud800","properties":{"token":"t"}}'))
    assert (r.status, r.body, sink.items) == (200, b"0", [])


@pytest.mark.parametrize("record", [
    [], 0, None, "x", True, {"event": None}, {"event": ["e"], "properties": {"token": "t"}},
    {"event": "e", "properties": "p"}, {"event": "e", "properties": {"token": ["t"]}},
    {"event": "e", "properties": {"token": {"a": 1}}}, {"event": "e", "properties": None},
    {"event": "e", "properties": {"token": "t", "time": "now"}},
    {"event": "e", "properties": {"token": "t", "time": -1e308}},
])
@pytest.mark.parametrize("path", ["/track", "/engage", "/groups"])
def test_wrong_types_everywhere_are_rejected_cleanly(record, path):
    app, sink = make()
    r = get(app, [record], path=path, verbose=1)
    assert r.status == 200 and json.loads(r.body)["status"] == 0 and sink.items == []


@pytest.mark.parametrize("path", ["/engage", "/groups"])
@pytest.mark.parametrize("op", ["$set", "$unset", "$union", "$add"])
@pytest.mark.parametrize("value", [None, 1, "x", True, [[]], {"a": {"b": []}}])
def test_wrong_operation_values_never_crash(path, op, value):
    app, _ = make()
    record = {"$token": "t", "$distinct_id": "u", "$group_key": "k", "$group_id": "g", op: value}
    r = get(app, record, path=path, verbose=1)
    assert r.status == 200 and json.loads(r.body)["status"] in (0, 1)


@pytest.mark.parametrize("path, text", [
    ("/track", '{"event":"e","properties":{"token":"t","x":1e400}}'),
    ("/track", '{"event":"e","properties":{"token":"t","x":-1e999}}'),
    ("/engage", '{"$token":"t","$distinct_id":"u","$set":{"a":1},"$time":1e400}'),
    ("/engage", '{"$token":"t","$distinct_id":1e400,"$set":{"a":1}}'),
])
def test_overflowing_float_is_refused(path, text):
    app, sink = make()
    r = call(app, "GET", path, qs(data=text))
    assert (r.status, r.body, sink.items) == (200, b"0", [])


@pytest.mark.parametrize("path", ["/track", "/import"])
def test_integer_time_too_large_for_a_float_is_rejected(path):
    app, sink = make(ROUTES)
    text = '{"event":"e","properties":{"token":"tok","distinct_id":"u","$insert_id":"i",' \
           '"time":1%s}}' % ("0" * 400)
    r = call(app, "GET", path, qs(data=text, api_key="s3cret"))
    assert (r.status, r.body, sink.items) == (200, b"0", [])


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_max_depth_setting_rejects_the_record_alone():
    # settings.max_depth: "deepest nesting inside a record's properties; deeper: record
    # rejected".  {"x": []} is depth 1.
    app, sink = make(max_depth=20)
    ok, deep = ev(x=nested(20)), ev(x=nested(21))
    r = get(app, [deep, ok], verbose=1)
    body = json.loads(r.body)
    assert body["status"] == 1 and body["error"].startswith("record 0: properties")
    assert sink.items == [("events", item(ok))]


def test_max_string_chars_rejects_the_record_alone():
    app, sink = make(max_string_chars=10)
    ok, long_one = ev(s="x" * 10), ev(s="x" * 11)
    nested_long = ev(s={"a": ["y" * 11]})
    r = get(app, [long_one, ok, nested_long], verbose=1)
    body = json.loads(r.body)
    assert body["status"] == 1 and body["error"].startswith("record 0: properties")
    assert sink.items == [("events", item(ok))]


def test_limits_apply_to_profile_operations():
    app, sink = make(max_depth=2, max_string_chars=5)
    good = {"$token": "t", "$distinct_id": "u", "$set": {"a": [["x"]]}}
    deep = {"$token": "t", "$distinct_id": "u", "$set": {"a": [[["x"]]]}}
    long_one = {"$token": "t", "$distinct_id": "u", "$set": {"a": "y" * 6}}
    body = json.loads(get(app, [deep, long_one, good], path="/engage", verbose=1).body)
    assert body["status"] == 1 and body["error"].startswith("record 0: $set")
    assert [json.loads(p) for _, p in sink.items] == [good]


# ---- CORS and headers on every kind of answer ------------------------------------------------

@pytest.mark.parametrize("request_kw, status", [
    (dict(method="GET", path="/track", query=qs(data=json.dumps(ev()))), 200),
    (dict(method="GET", path="/nope"), 404),
    (dict(method="PUT", path="/track"), 405),
    (dict(method="GET", path="/track", query="callback=%3C"), 400),
    (dict(method="GET", path="/import", query=qs(data=json.dumps(ev()))), 401),
    (dict(method="GET", path="/track", query=qs(data=json.dumps(ev()), redirect="http://a.b/")),
     302),
    (dict(method="POST", path="/track", body=b"x", content_type="image/png"), 415),
    (dict(method="OPTIONS", path="/track"), 204),
])
def test_every_answer_carries_cors_and_no_cache(request_kw, status):
    app, _ = make(ROUTES)
    r = call(app, headers={"Origin": "https://a.example:8443"}, **request_kw)
    assert r.status == status      # harness.check asserted CORS, Cache-Control, Length


def test_413_and_503_carry_cors_too():
    app, sink = make(max_records=1)
    r = get(app, [ev(), ev()], headers={"Origin": "https://z.example"})
    assert r.status == 413
    assert r.headers["access-control-allow-origin"] == "https://z.example"
    sink.failing = True
    r = get(app, ev(), headers={"Origin": "https://z.example"})
    assert r.status == 503
    assert r.headers["access-control-allow-credentials"] == "true"
