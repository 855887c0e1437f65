"""Developer tool, not a test: write the golden cases for wire shapes that are not
recorded from a live SDK run here: mixpanel-browser 2.83 requests as mixpanel-api.md 1.4
describes them, and the section 6.2 compatibility cases that concern the app alone.

Run by hand:  .venv/bin/python -m tests.unit.golden.write_browser_cases
Expected items come from record_sdks.expected (the contract, not ingest.clean); the
cases whose outcome is not a plain accept spell their expectation out literally.
"""
import json
import os
from urllib.parse import quote

from testkit.payloads import b64_json, basic_auth, compact_json
from tests.unit.golden.record_sdks import HERE, ROUTES, SECRET, TOKEN, expected, params_of

CLOCK = 1_795_664_800.25
ORIGIN = "http://shop.example:8080"
REMOTE = "203.0.113.7"
FORM = "application/x-www-form-urlencoded"
CORS = {"Access-Control-Allow-Origin": ORIGIN, "Access-Control-Allow-Credentials": "true"}


def browser_event(name, i, **extra):
    props = {"$os": "Linux", "$browser": "Chrome", "$current_url": "http://shop.example:8080/p?q=1",
             "$browser_version": 131, "$screen_height": 1080, "$screen_width": 1920,
             "mp_lib": "web", "$lib_version": "2.83.0", "$insert_id": "k3j4h5g6f7d8s9a%d" % i,
             "time": CLOCK - 2.5 + i / 1000.0, "distinct_id": "$device:1a2b3c-4d5e",
             "$device_id": "1a2b3c-4d5e", "token": TOKEN, "mp_sent_by_lib_version": "2.83.0"}
    props.update(extra)
    return {"event": name, "properties": props}


def enc(value):
    """encodeURIComponent."""
    return quote(value, safe="-_.!~*'()")


def request(method, path, query="", body="", ctype=None, headers=None):
    h = {"Origin": ORIGIN}
    if ctype:
        h["Content-Type"] = ctype
    h.update(headers or {})
    return {"method": method, "path": path, "query": query, "headers": h, "body": body}


def accepted_case(name, req, remote=REMOTE, client_ip=None):
    """A request whose every record must be accepted: outcome from the contract."""
    raw = dict(req, body=req["body"].encode())
    raw["headers"] = {k: v for k, v in req["headers"].items()}
    endpoint = req["path"].rstrip("/").rsplit("/", 1)[-1]
    response, items = expected(endpoint, params_of(raw), CLOCK, client_ip or remote)
    response["headers"] = CORS
    return {"name": name, "source": "mixpanel-api.md (hand-written)", "clock": CLOCK,
            "routes": ROUTES, "remote": remote, "request": req, "response": response,
            "items": items}


def literal_case(name, req, response, items, remote=REMOTE, routes=ROUTES):
    response = dict(response, headers=dict(CORS, **response.get("headers", {})))
    return {"name": name, "source": "mixpanel-api.md (hand-written)", "clock": CLOCK,
            "routes": routes, "remote": remote, "request": req, "response": response,
            "items": items}


def cases():
    batch = [browser_event("Page View", 0), browser_event("Add To Cart", 1, sku="A-1 b+2")]
    people = [{"$set": {"$email": "z@example.com", "$name": "Zoë"}, "$token": TOKEN,
               "$distinct_id": "$device:1a2b3c-4d5e", "$device_id": "1a2b3c-4d5e",
               "$user_id": "user-9", "$had_persisted_distinct_id": False},
              {"$union": {"tags": ["vip"]}, "$token": TOKEN, "$distinct_id": "user-9"}]
    group = [{"$set": {"tier": "gold"}, "$token": TOKEN, "$group_key": "company",
              "$group_id": "acme"}]
    cache = "_=1795664798123"
    yield "browser_batch_base64", accepted_case(
        "browser batch POST, base64 (default for non-mixpanel hosts), ip=1",
        request("POST", "/track/", "verbose=1&ip=1&" + cache, "data=" + enc(b64_json(batch)), FORM))
    yield "browser_batch_json", accepted_case(
        "browser batch POST, api_payload_format json",
        request("POST", "/track/", "verbose=1&ip=1&" + cache,
                "data=" + enc(compact_json(batch)), FORM))
    yield "browser_behind_nginx", accepted_case(
        "browser batch through the trusted proxy: ip from X-Forwarded-For",
        request("POST", "/track/", "verbose=1&ip=1&" + cache, "data=" + enc(b64_json(batch)), FORM,
                {"X-Forwarded-For": "198.51.100.23, 127.0.0.1"}),
        remote="127.0.0.1", client_ip="198.51.100.23")
    yield "browser_legacy_get", accepted_case(
        "browser legacy GET (api_method GET, batch_requests false)",
        request("GET", "/track/", "data=" + enc(b64_json(batch[0])) + "&ip=1&" + cache))
    yield "browser_send_beacon", accepted_case(
        "browser sendBeacon: text/plain;charset=UTF-8 form body",
        request("POST", "/track/", "ip=1&" + cache, "data=" + enc(b64_json(batch)),
                "text/plain;charset=UTF-8"))
    yield "browser_legacy_post_ip0", accepted_case(
        "browser legacy POST, one object, ip:false",
        request("POST", "/track/", "ip=0&" + cache, "data=" + enc(b64_json(batch[1])), FORM))
    yield "browser_engage_batch", accepted_case(
        "browser /engage/ batch", request("POST", "/engage/", "verbose=1&ip=1&" + cache,
                                          "data=" + enc(b64_json(people)), FORM))
    yield "browser_groups_batch", accepted_case(
        "browser /groups/ batch", request("POST", "/groups/", "verbose=1&ip=0&" + cache,
                                          "data=" + enc(b64_json(group)), FORM))
    yield "browser_preflight", literal_case(
        "OPTIONS preflight (xhr_headers)",
        request("OPTIONS", "/track/", headers={"Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers":
                                                   "content-type,x-trace-id"}),
        {"status": 204, "body": "",
         "headers": {"Access-Control-Allow-Headers": "content-type,x-trace-id"}}, [])
    yield "compat09_bad_base64_verbose", literal_case(
        "6.2 case 9: invalid data, verbose", request("GET", "/track", "verbose=1&data=%25%25%25"),
        {"status": 200, "content_type": "application/json",
         "body": '{"status": 0, "error": "data is neither JSON nor valid base64"}'}, [])
    yield "compat09_bad_json_plain", literal_case(
        "6.2 case 9: invalid JSON, plain", request("GET", "/track", "data=%7B%22event%22"),
        {"status": 200, "content_type": "text/plain; charset=utf-8", "body": "0"}, [])
    img_gif = literal_case(
        "6.2 case 10: img=1", request("GET", "/track/", "img=1&data=" + enc(b64_json(batch[0]))),
        {"status": 200, "content_type": "image/gif"}, [])
    img_gif["items"] = accepted_case("x", img_gif["request"])["items"]
    yield "compat10_img", img_gif
    redirect = literal_case(
        "6.2 case 10: redirect", request("GET", "/track", "redirect=" + enc(
            "https://shop.example/next?a=1") + "&data=" + enc(b64_json(batch[0]))),
        {"status": 302, "body": "", "headers": {"Location": "https://shop.example/next?a=1"}},
        [])
    redirect["items"] = accepted_case("x", redirect["request"])["items"]
    yield "compat10_redirect", redirect
    good = {"event": "Old", "properties": {"token": TOKEN, "distinct_id": "u1",
                                           "time": 1_790_000_000, "$insert_id": "imp-ok"}}
    bad = {"event": "Old", "properties": {"token": TOKEN, "time": 1_790_000_000,
                                          "$insert_id": "imp-bad"}}
    strict = literal_case(
        "6.2 case 11: /import strict=1 with one bad record",
        request("POST", "/import", "strict=1", "data=" + enc(json.dumps([good, bad])), FORM,
                {"Authorization": basic_auth(SECRET)}),
        {"status": 400, "content_type": "application/json"},
        [["imports", compact_json(dict(good, properties=dict(
            good["properties"], mp_processing_time_ms=int(CLOCK * 1000))))]])
    strict["response"]["json"] = {
        "code": 400, "error": "some data points in the request failed validation",
        "status": "Bad Request", "num_records_imported": 1,
        "failed_records": [{"index": 1, "$insert_id": "imp-bad",
                            "field": "properties.distinct_id",
                            "message": "properties.distinct_id is missing"}]}
    yield "compat11_import_strict", strict
    yield "compat12_track_ignores_credentials", accepted_case(
        "6.2 case 12: BufferedConsumer quirk, credentials on /track are ignored",
        request("POST", "/track", "", "data=" + enc(json.dumps(batch[0])) +
                "&verbose=1&ip=0&api_key=whatever", FORM,
                {"Authorization": basic_auth("nope")}))
    yield "blocked_token", literal_case(
        "blocked token: answered 1, nothing queued",
        request("GET", "/track", "data=" + enc(json.dumps({"event": "e", "properties": {
            "token": "blocked-one"}}))),
        {"status": 200, "content_type": "text/plain; charset=utf-8", "body": "1"}, [],
        routes=dict(ROUTES, blocked_tokens=["blocked-one"]))


def main():
    for name, case in cases():
        with open(os.path.join(HERE, "hand_%s.json" % name), "w", encoding="utf-8") as fh:
            json.dump(case, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
        print("wrote hand_%s.json" % name)


if __name__ == "__main__":
    main()
