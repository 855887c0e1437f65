"""Developer tool, not a test: write the golden cases for the phone SDKs' wire shapes,
which cannot be recorded here (no Android or iOS runtime on these machines).

Run by hand:  .venv/bin/python -m tests.unit.golden.write_phone_cases
Each request is built the way its SDK builds it (phone_wire.py: the SDK's JSON writer,
URL encoding and gzip), from records shaped as the SDK shapes them; every case names the
SDK version and the source files it follows, and what the SDK does with the answer
(test_golden.py checks that too, with phone_wire.READERS).  The expected queue items
come from the record contract via record_sdks.expected, reading the wire text with the
standard json module, not from ingest; records the contract rejects are listed with the
reason by hand.  test_golden.py also checks the files equal what this writes.
"""
import base64
import json
import os

from tests.unit.golden import phone_wire as w
from tests.unit.golden.record_sdks import HERE, ROUTES, TOKEN, expected

CLOCK = 1_795_664_800.25            # 2026-11-26 00:26:40 UTC
NOW_MS = int(CLOCK * 1000)
DAY_MS = 86_400_000
REMOTE = "203.0.113.7"
OLD = "properties.time is more than 5 days old (use /import)"
SURROGATE = "record contains invalid Unicode (lone surrogate)"
DEVICE = "6f1d2c3b-4a59-4e68-8d7c-0b1a2f3e4d5c"

ANDROID = {"name": "mixpanel-android", "version": "8.9.0", "reads": "android",
           "source": "mixpanel/mixpanel-android v8.9.0, analytics/src/main/java/com/mixpanel/"
                     "android/: util/HttpService.java (form body, Uri encoding, gzip, status "
                     "handling), mpmetrics/AnalyticsMessages.java (base64 data, verbose on "
                     "debug builds, what a 2xx/4xx/5xx does), mpmetrics/MPDbAdapter.java "
                     "(org.json batch of 50), mpmetrics/MPConfig.java (?ip=, data expiration),"
                     " mpmetrics/MixpanelAPI.java (record shapes)"}
FLUTTER_ANDROID = dict(ANDROID, name="mixpanel_flutter on Android", version="2.12.0",
                       source="mixpanel/mixpanel-flutter v2.12.0 (lib/mixpanel_flutter.dart: "
                              "mp_lib and $lib_version as super properties; android/"
                              "build.gradle: mixpanel-android 8.9.0), then as mixpanel-android")
SWIFT = {"name": "mixpanel-swift", "version": "6.5.1", "reads": "swift",
         "source": "mixpanel/mixpanel-swift 6.5.1, Sources/: FlushRequest.swift (JSON body, "
                   "gzip on /track only, Retry-After), Network.swift (status 200 + parse), "
                   "Flush.swift (batches of 50), JSONHandler.swift (JSONSerialization), "
                   "MPDB.swift (row id), Track.swift, People.swift, Group.swift"}
FLUTTER_IOS = dict(SWIFT, name="mixpanel_flutter on iOS", version="2.12.0",
                   source="mixpanel/mixpanel-flutter v2.12.0 (ios/mixpanel_flutter.podspec: "
                          "Mixpanel-swift 6.5.1), then as mixpanel-swift")
IPHONE = {"name": "mixpanel-iphone", "version": "5.0.9", "reads": "iphone",
          "source": "mixpanel/mixpanel-iphone v5.0.9, Sources/: MPNetwork.m (JSON body, "
                    "never gzipped, only 5xx keeps a batch), MPJSONHandler.m "
                    "(NSJSONSerialization, invalid UTF-8 -> U+FFFD), Mixpanel.m (VERSION "
                    "still 5.0.8), MixpanelPeople.m, MixpanelGroup.m, MPDB.m (row id)"}
RN = {"name": "mixpanel-react-native (JavaScript mode)", "version": "3.2.1",
      "reads": "react-native",
      "source": "mixpanel/mixpanel-react-native v3.2.2 tag (package.json 3.2.1), javascript/"
                ": mixpanel-network.js (form body, encodeURIComponent(JSON.stringify), "
                "response.json() before the status), mixpanel-core.js (batches of 50 every "
                "10 s, 400 drops the first record), mixpanel-main.js, mixpanel-utils.js"}


def meta(seq, event_id="1a2b3c4d5e6f7081"):
    return {"$mp_event_id": event_id, "$mp_session_id": "7f3e9a0c1b2d4e5f",
            "$mp_session_seq_id": seq, "$mp_session_start_sec": 1_795_664_500}


# ---- records as each SDK shapes them ---------------------------------------------------

def android_event(name, seq, props, age_ms=0, lib=("android", "8.9.0")):
    p = {"mp_lib": "android", "$lib_version": "8.9.0", "$os": "Android", "$os_version": "14",
         "$manufacturer": "Google", "$brand": "google", "$model": "Pixel 8",
         "$screen_dpi": 420, "$screen_height": 2400, "$screen_width": 1080,
         "$app_version": "3.1.0", "$app_version_string": "3.1.0", "$app_release": "310",
         "$app_build_number": "310", "$has_nfc": True, "$has_telephone": True,
         "$carrier": "T-Mobile", "$wifi": True, "$bluetooth_enabled": False,
         "$bluetooth_version": "ble", "token": TOKEN}
    p.update({"mp_lib": lib[0], "$lib_version": lib[1]})   # super properties, in place
    p.update({"time": NOW_MS - 1500 - age_ms + seq, "distinct_id": "$device:" + DEVICE,
              "$had_persisted_distinct_id": False, "$device_id": DEVICE})
    p.update(props)
    return {"event": name, "properties": p, "$mp_metadata": meta(seq)}


def android_update(op, value, seq, group=None):
    rec = {op: value, "$token": TOKEN, "$time": NOW_MS - 900 + seq}
    if group:
        rec.update({"$group_key": group[0], "$group_id": group[1]})
    else:
        rec.update({"$had_persisted_distinct_id": False, "$device_id": DEVICE,
                    "$distinct_id": "user-7", "$user_id": "user-7"})
    rec["$mp_metadata"] = meta(seq, "2b3c4d5e6f708192")
    return rec


def swift_event(name, row, props, age_ms=0, lib=("swift", "6.5.1")):
    p = {"$os": "iOS", "$os_version": "18.1", "$manufacturer": "Apple",
         "$model": "iPhone16,1", "mp_lib": lib[0], "$lib_version": lib[1],
         "$screen_height": 852, "$screen_width": 393, "$app_version_string": "3.1.0",
         "$app_build_number": "310", "$wifi": True, "token": TOKEN,
         "time": float(NOW_MS - 2000 - age_ms + row), "distinct_id": "$device:" + DEVICE.upper(),
         "$device_id": DEVICE.upper()}
    p.update(props)
    return {"properties": p, "id": row, "event": name, "$mp_metadata": meta(row)}


def swift_update(op, value, row, group=None, extra=None):
    rec = {"$token": TOKEN, "$time": float(NOW_MS - 700 + row), op: value,
           "$mp_metadata": meta(row, "3c4d5e6f70819203")}
    if group:
        rec.update({"$group_key": group[0], "$group_id": group[1]})
    else:
        rec.update({"$device_id": DEVICE.upper(), "$distinct_id": "user-7"})
    rec.update(extra or {})
    rec["id"] = row
    return rec


def iphone_event(name, row, props):
    p = {"mp_lib": "iphone", "$lib_version": "5.0.8", "$os": "iOS", "$os_version": "17.6",
         "$model": "iPhone14,5", "token": TOKEN, "time": float(NOW_MS - 3000 + row),
         "distinct_id": "$device:" + DEVICE.upper(), "$device_id": DEVICE.upper()}
    p.update(props)
    return {"event": name, "properties": p, "$mp_metadata": meta(row), "id": row}


def rn_event(name, seq, props, age_ms=0):
    p = {"token": TOKEN, "time": NOW_MS - 2500 - age_ms + seq, "$os": "android",
         "$os_version": 34, "mp_lib": "react-native", "$lib_version": "3.2.1",
         "$android_brand": "google", "$android_manufacturer": "Google",
         "$android_model": "Pixel 8"}
    p.update(props)
    p.update({"distinct_id": "$device:" + DEVICE, "$device_id": DEVICE, "$user_id": None})
    return {"event": name, "properties": p, "$mp_metadata": meta(0, "3f2a1b0c4d5e")}


def rn_update(op, value, seq, group=None):
    rec = {"$mp_metadata": meta(0, "1c2d3e4f5a6b"), "$token": TOKEN, "$time": NOW_MS - 600 + seq}
    if group:
        rec.update({"$group_key": group[0], "$group_id": group[1], op: value})
    else:
        rec.update({op: value, "$distinct_id": "user-7", "$device_id": DEVICE,
                    "$user_id": "user-7"})
    return rec


# ---- requests as each SDK sends them ---------------------------------------------------

PATHS = {"track": "/track/", "engage": "/engage/", "groups": "/groups/"}


def android_request(endpoint, records, ip=True, verbose=False, gzip=False):
    """HttpService.performRequest: POST <endpoint>?ip=N, the params map (a HashMap:
    `data` before `verbose`) through Uri.Builder, optionally gzipped whole."""
    text = w.org_json(records)
    data = base64.b64encode(w.java_utf8(text)).decode("ascii")
    body = ("data=" + w.uri_component(data) + ("&verbose=1" if verbose else "")).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if gzip:
        body, headers["Content-Encoding"] = w.java_gzip(body), "gzip"
    return _request(endpoint, ip, headers, body), data, verbose


def apple_request(endpoint, records, ip=True, gzip=False):
    """FlushRequest.sendRequest (MPNetwork's flushQueue is the same without gzip):
    POST <endpoint>?ip=N, the JSON array as the body."""
    text = w.foundation_json(records)
    body = text.encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if gzip:
        assert endpoint == "track"          # Swift gzips /track only
        body, headers["Content-Encoding"] = w.zlib_gzip(body), "gzip"
    return _request(endpoint, ip, headers, body), text, False


def rn_request(endpoint, records, ip=True):
    """MixpanelNetwork.sendRequest: `?ip=${+useIP}`, body data=encodeURIComponent(JSON)."""
    text = w.js_json(records)
    body = ("data=" + w.uri_component(text)).encode("ascii")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return _request(endpoint, ip, headers, body), text, False


def _request(endpoint, ip, headers, body):
    req = {"method": "POST", "path": PATHS[endpoint], "query": "ip=%d" % ip,
           "headers": headers}
    try:
        req["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        req["body_base64"] = base64.b64encode(body).decode("ascii")
    return req


# ---- the outcome, from the contract ----------------------------------------------------

def case(name, sdk, outcome, built, rejected=None, failing=False):
    """One golden case.  `rejected` maps a record index to the contract's reason text;
    `failing` makes the sink refuse (503 + Retry-After)."""
    req, data, verbose = built
    endpoint = req["path"].strip("/")
    records = json.loads(base64.b64decode(data) if sdk["reads"] == "android" else data)
    rejected = rejected or {}
    kept = [r for i, r in enumerate(records) if i not in rejected]
    params = {"data": json.dumps(kept), "ip": req["query"][-1], "verbose": "1" * verbose}
    response, items = expected(endpoint, params, CLOCK, REMOTE)
    if rejected or not kept:
        error = ("record %d: %s" % min(rejected.items())) if rejected else None
        status = 1 if kept else 0
        response.pop("body")
        if verbose:
            response["json"] = {"status": status, "error": error}
        else:
            response["body"] = str(status)
    if failing:
        items = []
        response = {"status": 503, "content_type": "application/json",
                    "json": {"status": 0, "error": "temporarily unable to store records; retry"},
                    "headers": {"Retry-After": "1"}}
    out = {"name": name, "source": sdk["source"],
           "sdk": {"name": sdk["name"], "version": sdk["version"], "reads": sdk["reads"],
                   "outcome": outcome}, "clock": CLOCK, "routes": ROUTES, "remote": REMOTE,
           "request": req, "response": response, "items": items}
    if failing:
        out["sink"] = "failing"
    return out


# ---- the cases ---------------------------------------------------------------------------

def android_cases():
    url = {"url": "https://shop.example/p/1?ref=a/b", "path": "/p/1"}
    batch = [android_event("Screen Viewed", 0, url),
             android_event("Search", 1, {"query": "line\u2028sep \U0001F600 Zo\u00eb",
                                         "tab": "a\tb"}),
             android_event("Checkout", 2, {"$duration": 12.345, "cart": {"items": 2}})]
    yield "android_track_ip1", case("Android batch of events, ip=1", ANDROID, "delete",
                                    android_request("track", batch))
    yield "android_track_verbose_ip0", case(
        "Android debug build: verbose=1 in the body, IP geolocation off", ANDROID, "delete",
        android_request("track", batch[:1], ip=False, verbose=True))
    yield "android_track_gzip", case("Android GzipRequestPayload on /track", ANDROID, "delete",
                                     android_request("track", batch[1:], gzip=True))
    device = {"$android_lib_version": "8.9.0", "$android_os": "Android",
              "$android_os_version": "14", "$android_manufacturer": "Google",
              "$android_brand": "google", "$android_model": "Pixel 8",
              "$android_app_version": "3.1.0", "$android_app_version_code": "310"}
    people = [android_update("$set", dict(device, plan="pro", site="a/b"), 0),
              android_update("$set_once", {"first_seen": "2026-11-20"}, 1),
              android_update("$add", {"logins": 1.0, "credits": 2.5}, 2),
              android_update("$merge", {"prefs": {"theme": "dark", "beta": True}}, 3),
              android_update("$append", {"$transactions": {
                  "$amount": 9.99, "$time": "2026-11-26T00:26:38", "sku": "A-1"}}, 4),
              android_update("$union", {"tags": ["vip"]}, 5),
              android_update("$remove", {"tags": "trial"}, 6),
              android_update("$unset", ["legacy"], 7),
              android_update("$delete", None, 8)]
    yield "android_engage_ops", case(
        "Android People: every operation, People.merge() and trackCharge() included",
        ANDROID, "delete", android_request("engage", people))
    yield "android_engage_merge", case(
        "Android People.merge() alone", ANDROID, "delete",
        android_request("engage", people[3:4]))
    yield "android_engage_gzip", case("Android gzip on /engage", ANDROID, "delete",
                                      android_request("engage", people[:2], gzip=True))
    groups = [android_update("$set", {"tier": "gold"}, 0, ("company", "acme")),
              android_update("$set_once", {"since": 2019}, 1, ("company", "acme")),
              android_update("$union", {"regions": ["eu"]}, 2, ("company", 42)),
              android_update("$remove", {"regions": "us"}, 3, ("company", "acme")),
              android_update("$unset", ["old"], 4, ("company", "acme")),
              android_update("$delete", None, 5, ("company", "gone"))]
    yield "android_groups_gzip", case("Android groups, every operation, gzip", ANDROID,
                                      "delete", android_request("groups", groups, gzip=True))
    numbers = {"tiny": 1e-7, "huge": 1e20, "long": 9007199254740993,
               "long_max": 9223372036854775807, "neg_zero": -0.0, "big": 12345678.9,
               "small": 1e-4, "milli": 0.001, "int_plus": 2147483648, "whole": 3.0,
               "lone": "a\ud800b", "ctl": "\x01"}
    yield "android_numbers", case(
        "Android org.json numbers (1.0E-7, 1.0E20, longs, -0) and a lone surrogate ('?')",
        ANDROID, "delete", android_request("track", [android_event("Numbers", 0, numbers)]))
    offline = [android_event("Offline", 0, {}, age_ms=2 * DAY_MS),
               android_event("Offline", 1, {}, age_ms=5 * DAY_MS - 3_600_000),
               android_event("Offline", 2, {}, age_ms=6 * DAY_MS)]
    yield "android_offline", case(
        "Android offline events 2 days, 5 days less an hour, and 6 days old (sent only "
        "when DataExpiration was raised): the last is rejected, the batch deleted",
        ANDROID, "delete", android_request("track", offline), rejected={2: OLD})
    yield "android_503", case("Android gets 503 + Retry-After: keeps the batch", ANDROID,
                              "retry", android_request("track", batch[:1]), failing=True)
    flutter = [android_event("Tapped", 0, {"screen": "home/feed"}, lib=("flutter", "2.12.0"))]
    yield "flutter_android_track", case("Flutter on Android", FLUTTER_ANDROID, "delete",
                                        android_request("track", flutter))


def swift_cases():
    batch = [swift_event("Screen Viewed", 11, {"url": "https://shop.example/p/1?ref=a/b"}),
             swift_event("Search", 12, {"query": "line\u2028sep \U0001F600 Zo\u00eb",
                                        "$duration": 1.234})]
    yield "swift_track_ip1", case("Swift batch of events, ip=1", SWIFT, "delete",
                                  apple_request("track", batch))
    yield "swift_track_gzip", case("Swift useGzipCompression (/track only)", SWIFT, "delete",
                                   apple_request("track", batch, gzip=True))
    people = [swift_update("$set", {"plan": "pro", "$ios_lib_version": "6.5.1"}, 21),
              swift_update("$set_once", {"first_seen": "2026-11-20"}, 22),
              swift_update("$add", {"logins": 1}, 23, extra={"$ignore_time": 1}),
              swift_update("$append", {"$transactions": {
                  "$amount": 9.99, "$time": "2026-11-26T00:26:38.123Z"}}, 24),
              swift_update("$union", {"tags": ["vip"]}, 25),
              swift_update("$remove", {"tags": "trial"}, 26),
              swift_update("$unset", ["legacy"], 27),
              swift_update("$delete", {}, 28)]
    yield "swift_engage_ops", case("Swift People: every public operation, ip=0", SWIFT,
                                   "delete", apple_request("engage", people, ip=False))
    groups = [swift_update("$set", {"tier": "gold"}, 31, ("company", 42)),
              swift_update("$set_once", {"since": 2019}, 32, ("company", "acme")),
              swift_update("$union", {"regions": ["eu"]}, 33, ("company", "acme")),
              swift_update("$remove", {"regions": "us"}, 34, ("company", "acme")),
              swift_update("$unset", ["old"], 35, ("company", "acme")),
              swift_update("$delete", {}, 36, ("company", "gone"))]
    yield "swift_groups", case("Swift groups, every operation (an Int group id too)", SWIFT,
                               "delete", apple_request("groups", groups))
    numbers = {"int64_max": 9223372036854775807, "uint64_max": 18446744073709551615,
               "whole_double": 1795664800123.0, "shortest": 0.1,
               "digits17": w.Raw("0.10000000000000001"), "tiny17": w.Raw("9.9999999999999995e-08"),
               "float": w.f32(1.234), "repaired": "\ufffd"}
    yield "swift_numbers", case(
        "Swift JSONSerialization numbers: 64-bit ints, integral doubles without a point, "
        "17-digit doubles (older Foundation), a Float widened", SWIFT, "delete",
        apple_request("track", [swift_event("Numbers", 13, numbers)]))
    old = [swift_event("Offline", 14, {}, age_ms=6 * DAY_MS),
           swift_event("Offline", 15, {}, age_ms=9 * DAY_MS)]
    yield "swift_offline_old", case(
        "Swift events queued offline for 6 and 9 days: all rejected, answered 0, and the "
        "SDK deletes the batch (a 200)", SWIFT, "delete", apple_request("track", old),
        rejected={0: OLD, 1: OLD})
    yield "swift_503", case("Swift gets 503 + Retry-After: keeps the batch, waits", SWIFT,
                            "retry", apple_request("track", batch[:1]), failing=True)
    flutter = [swift_event("Tapped", 16, {"screen": "home/feed"}, lib=("flutter", "2.12.0"))]
    yield "flutter_ios_track", case("Flutter on iOS", FLUTTER_IOS, "delete",
                                    apple_request("track", flutter))


def iphone_cases():
    events = [iphone_event("Checkout", 41, {"$duration": w.f32(1.234), "note": "\ufffd",
                                            "url": "https://shop.example/a/b"})]
    yield "iphone_track", case(
        "iPhone event: $duration as a widened float, an invalid string sent as U+FFFD",
        IPHONE, "delete", apple_request("track", events))
    people = [swift_update("$set", {"plan": "pro"}, 51, extra={"$ignore_time": True}),
              swift_update("$set_once", {"first_seen": "2026-11-20"}, 52),
              swift_update("$add", {"logins": 1}, 53),
              swift_update("$append", {"$transactions": {
                  "$amount": 9.99, "$time": "2026-11-26T00:26:38.123Z"}}, 54),
              swift_update("$union", {"tags": ["vip"]}, 55),
              swift_update("$remove", {"tags": "trial"}, 56),
              swift_update("$unset", ["legacy"], 57),
              swift_update("$delete", {}, 58)]
    yield "iphone_engage_ops", case("iPhone People: every public operation", IPHONE,
                                    "delete", apple_request("engage", people))
    groups = [{"$token": TOKEN, "$time": float(NOW_MS - 500), "$group_key": "company",
               "$group_id": "acme", op: value, "id": 61 + i}
              for i, (op, value) in enumerate([
                  ("$set", {"tier": "gold"}), ("$set_once", {"since": 2019}),
                  ("$union", {"regions": ["eu"]}), ("$remove", {"regions": "us"}),
                  ("$unset", ["old"]), ("$delete", {})])]
    yield "iphone_groups", case("iPhone groups, every operation", IPHONE, "delete",
                                apple_request("groups", groups))
    yield "iphone_503", case("iPhone gets 503: keeps the batch", IPHONE, "retry",
                             apple_request("track", events), failing=True)


def rn_cases():
    batch = [rn_event("Screen Viewed", 0, {"url": "https://shop.example/p/1?ref=a/b"}),
             rn_event("Search", 1, {"query": "line\u2028sep \U0001F600 Zo\u00eb & more",
                                    "$duration": 3})]
    yield "rn_track_ip1", case("React Native batch of events, ip=1", RN, "delete",
                               rn_request("track", batch))
    people = [rn_update("$set", {"plan": "pro"}, 0),
              rn_update("$set_once", {"first_seen": "2026-11-20"}, 1),
              rn_update("$add", {"logins": 1}, 2),
              rn_update("$append", {"$transactions": {"$amount": 9.99,
                                                      "$time": NOW_MS - 590}}, 3),
              rn_update("$union", {"tags": ["vip"]}, 4),
              rn_update("$remove", {"tags": "trial"}, 5),
              rn_update("$unset", ["legacy"], 6),
              rn_update("$delete", "null", 7)]
    yield "rn_engage_ops", case("React Native People: every operation", RN, "delete",
                                rn_request("engage", people))
    groups = [rn_update(op, value, i, ("company", "acme")) for i, (op, value) in enumerate([
        ("$set", {"tier": "gold"}), ("$set_once", {"since": 2019}), ("$unset", ["old"]),
        ("$remove", {"regions": "us"}), ("$union", {"regions": ["eu"]}), ("$delete", "null")])]
    yield "rn_groups", case("React Native groups, every operation, ip=0", RN, "delete",
                            rn_request("groups", groups, ip=False))
    numbers = {"tiny": 1e-7, "huge": 1e21, "past_2_53": 9007199254740993, "tenth": 0.1,
               "neg_zero": -0.0}
    yield "rn_numbers", case("React Native JSON.stringify numbers (1e-7, 1e+21, 2**53)", RN,
                             "delete", rn_request("track", [rn_event("Numbers", 2, numbers)]))
    lone = [rn_event("Typed", 3, {"text": "a\ud800b"}), rn_event("Typed", 4, {"text": "ok"})]
    yield "rn_lone_surrogate", case(
        "React Native lone surrogate (JSON.stringify writes \\ud800): that record is "
        "rejected, the rest kept, and the SDK deletes the batch", RN, "delete",
        rn_request("track", lone), rejected={0: SURROGATE})
    old = [rn_event("Offline", 5, {}, age_ms=4 * DAY_MS),
           rn_event("Offline", 6, {}, age_ms=8 * DAY_MS)]
    yield "rn_offline", case(
        "React Native events 4 and 8 days old: the older one is rejected", RN, "delete",
        rn_request("track", old), rejected={1: OLD})
    yield "rn_503", case("React Native gets 503: the JSON body parses, the status retries",
                         RN, "retry", rn_request("track", batch[:1]), failing=True)


def cases():
    for group in (android_cases, swift_cases, iphone_cases, rn_cases):
        for name, one in group():
            yield "phone_" + name, one


def render(one):
    return json.dumps(one, indent=1, ensure_ascii=False) + "\n"


def main():
    for name, one in cases():
        with open(os.path.join(HERE, name + ".json"), "w", encoding="utf-8") as fh:
            fh.write(render(one))
        print("wrote %s.json" % name)


if __name__ == "__main__":
    main()
