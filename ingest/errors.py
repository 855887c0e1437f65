"""The project's one error type for requests, the per-record rejection type, and the
catalogue of every reason either can carry.

What it is for: a stage that refuses something raises `IngestError(reason, ...)` (the
whole request) or `RecordRejected(reason, field, ...)` (one record; the others go on).
The status, the message and any extra header come from `REASONS`, so the same reason
string is the verbose error body's text source, the log line and the metric label, and
docs/reference/reasons.md is generated from this table (ingest/reference.py).

What it must not do: build a reason from input (reasons are metric labels), or hold
HTTP formatting (ingest/http/answers.py turns an IngestError into an answer).
"""

REQUEST = "request"      # the whole request is answered with the reason's status
RECORD = "record"        # one record is dropped; the request still answers 200
EDGE = "edge"            # answered before the app sees the request (HTTP parser, nginx)


class Reason:
    """One catalogue entry: HTTP status (for request-level use), where it applies, what
    it means (for the reference page), message templates by variant, extra headers."""

    __slots__ = ("status", "scopes", "meaning", "messages", "headers", "retry_after_s")

    def __init__(self, status, scopes, meaning, messages, headers=(), retry_after_s=None):
        self.status = status
        self.scopes = scopes
        self.meaning = meaning
        self.messages = messages
        self.headers = headers
        self.retry_after_s = retry_after_s

    def text(self, variant, params):
        return self.messages[variant].format(**params)


def _reason(status, scopes, meaning, message, headers=(), retry_after_s=None, **variants):
    return Reason(status, scopes, meaning, dict({"message": message}, **variants), headers,
                  retry_after_s)


_MISSING = dict(message="{field} is missing", wrong_type="{field} must be a non-empty string")

# reason -> Reason.  Request-level reasons with status 200 are the API's legacy answer
# (`0`, or verbose JSON) for data that cannot be read; /import strict answers them 400.
REASONS = {
    # ---- framing and body --------------------------------------------------------------
    "malformed_http": _reason(
        400, (EDGE,), "The HTTP request line or headers could not be parsed safely"
        " (bad request line or version, a header block cut short, a repeated or"
        " non-numeric Content-Length, a Transfer-Encoding other than chunked).",
        "malformed HTTP request"),
    "too_many_headers": _reason(
        431, (REQUEST,), "More header lines than max_headers.", "more than {limit} header lines"),
    "body_too_large": _reason(
        413, (REQUEST, EDGE), "The body is larger than max_body_bytes as sent, or than"
        " max_decompressed_bytes after decompression (nginx answers the same for"
        " client_max_body_size).",
        "request body exceeds {limit} bytes",
        decompressed="decompressed body exceeds {limit} bytes",
        nginx="request body too large"),
    "short_body": _reason(400, (REQUEST,), "The connection ended before Content-Length bytes.",
                          "request body ended early"),
    "bad_body": _reason(
        400, (REQUEST,), "The body could not be read: a bad chunk header, or a body cut"
        " short.", "request body could not be read"),
    "body_timeout": _reason(
        408, (REQUEST,), "The body did not arrive within body_timeout_s of the headers (or"
        " a read waited longer than read_timeout_s); the connection is closed.",
        "request body not received in time"),
    "unsupported_encoding": _reason(415, (REQUEST,), "Content-Encoding other than gzip,"
                                    " x-gzip, deflate or identity.",
                                    "Content-Encoding must be gzip"),
    "invalid_gzip": _reason(400, (REQUEST,), "A compressed body that does not inflate.",
                            "compressed body is not valid gzip",
                            truncated="compressed body is truncated"),
    "unsupported_content_type": _reason(
        415, (REQUEST,), "A body that is not form-urlencoded, text/*, JSON or NDJSON.",
        "body must be form-urlencoded, text/plain or JSON"),
    # ---- routing of the request itself -------------------------------------------------
    "not_found": _reason(404, (REQUEST,), "A path that is not an endpoint or operator path.",
                         "not found; use /track, /engage, /groups or /import"),
    "method_not_allowed": _reason(405, (REQUEST,), "A method other than GET, POST or OPTIONS"
                                  " on an endpoint (HEAD included).", "method not allowed",
                                  headers=(("Allow", "GET, POST, OPTIONS"),)),
    "invalid_callback": _reason(400, (REQUEST,), "callback= that is not a JavaScript"
                                " identifier or dotted path of at most 128 characters.",
                                "callback must be a JavaScript identifier or dotted path"),
    "invalid_redirect": _reason(400, (REQUEST,), "redirect= that is not an absolute"
                                " http(s) URL of printable ASCII (at most 2,048 characters).",
                                "redirect must be an http(s) URL"),
    "invalid_credentials": _reason(401, (REQUEST,), "/import without a configured API"
                                   " secret in Basic auth or api_key.", "Invalid credentials"),
    # ---- the data parameter ------------------------------------------------------------
    "missing_data": _reason(200, (REQUEST,), "No data parameter, or an empty one.",
                            "data parameter is missing"),
    "invalid_base64": _reason(200, (REQUEST,), "data is neither JSON nor base64.",
                              "data is neither JSON nor valid base64"),
    "invalid_utf8": _reason(200, (REQUEST,), "The body, or data after base64, is not UTF-8.",
                            "data is not valid UTF-8", body="request body is not valid UTF-8"),
    "invalid_json": _reason(200, (REQUEST,), "data is not JSON (NaN and Infinity included).",
                            "data is not valid JSON"),
    "invalid_data": _reason(200, (REQUEST,), "data is JSON but neither an object nor an array.",
                            "data must be a JSON object or array"),
    "too_deep": _reason(
        400, (REQUEST, RECORD), "Nesting deeper than the JSON parser allows (whole request),"
        " or deeper than max_depth inside a record (that record).",
        "data is nested too deeply", record="{field} is nested deeper than {limit} levels"),
    "too_many_records": _reason(413, (REQUEST,), "More records in one request than max_records.",
                                "{count} records exceed the limit of {limit}"),
    # ---- one record --------------------------------------------------------------------
    "not_an_object": _reason(None, (RECORD,), "A record that is not a JSON object.",
                             "record is not a JSON object"),
    "invalid_event": _reason(None, (RECORD,), "An event without a non-empty string `event`.",
                             **_MISSING),
    "invalid_properties": _reason(None, (RECORD,), "An event whose `properties` is missing"
                                  " or not an object.", "properties is missing",
                                  wrong_type="properties must be an object"),
    "missing_token": _reason(None, (RECORD,), "No project token (properties.token, or"
                             " $token on /engage and /groups).", **_MISSING),
    "too_many_properties": _reason(None, (RECORD,), "More keys than max_properties in"
                                   " properties or an operation's object.",
                                   "{field} has more than {limit} keys"),
    "string_too_long": _reason(None, (RECORD,), "A string value longer than max_string_chars.",
                               "{field} has a string longer than {limit} characters"),
    "missing_distinct_id": _reason(None, (RECORD,), "/import without properties.distinct_id,"
                                   " or /engage without $distinct_id.", **_MISSING),
    "missing_insert_id": _reason(None, (RECORD,), "/import without properties.$insert_id.",
                                 **_MISSING),
    "missing_group_key": _reason(None, (RECORD,), "/groups without $group_key.", **_MISSING),
    "missing_group_id": _reason(None, (RECORD,), "/groups without $group_id.", **_MISSING),
    "missing_time": _reason(None, (RECORD,), "/import without properties.time.",
                            "{field} is missing"),
    "invalid_time": _reason(None, (RECORD,), "properties.time that is not a number.",
                            "{field} must be a number"),
    "time_too_old": _reason(None, (RECORD,), "/track: more than 5 days old (use /import);"
                            " /import: before 1971.",
                            "{field} is more than 5 days old (use /import)",
                            before_1971="{field} is before 1971"),
    "time_in_future": _reason(None, (RECORD,), "/import: more than an hour ahead of the"
                              " server (/track clamps it to now instead).",
                              "{field} is more than an hour in the future"),
    "invalid_operation": _reason(None, (RECORD,), "/engage or /groups with no operation,"
                                 " several, or one whose value has the wrong type.",
                                 "expected exactly one of {ops}, got {present}",
                                 wrong_type="{field} must be {kind}"),
    "unknown_token": _reason(None, (RECORD,), "A token missing from the routing table when"
                             " strict_tokens is on.", "token is not in the routing table"),
    "forbidden_token": _reason(None, (RECORD,), "/import: the credentials are not this"
                               " token's secret.", "credentials are not valid for this token"),
    "invalid_unicode": _reason(None, (RECORD,), "A lone surrogate that cannot be UTF-8.",
                               "record contains invalid Unicode (lone surrogate)"),
    "invalid_number": _reason(None, (RECORD,), "A number out of range (1e400 parses as"
                              " infinity).", "record contains a number out of range"),
    "record_too_large": _reason(None, (RECORD,), "A record longer than max_record_bytes as"
                                " compact JSON.", "record exceeds {limit} bytes"),
    # ---- the server's own state ----------------------------------------------------------
    "overloaded": _reason(503, (REQUEST,), "max_in_flight requests, or"
                          " max_body_bytes_in_flight of bodies (counted decompressed, as"
                          " they arrive), are already being handled.",
                          "server busy; retry", retry_after_s=1),
    "draining": _reason(503, (REQUEST,), "The worker is shutting down (SIGTERM); requests"
                        " read now are refused before anything is stored.",
                        "server shutting down; retry", retry_after_s=1),
    "unavailable": _reason(503, (REQUEST,), "No Kestrel server stored the records and the"
                           " spool could not take them (none configured, full, or failing).",
                           "temporarily unable to store records; retry", retry_after_s=1),
    "no_worker": _reason(503, (EDGE,), "nginx found no worker to take the request.",
                         "no worker available", retry_after_s=1),
    "internal": _reason(500, (REQUEST,), "A bug: the traceback is logged, never sent.",
                        "internal error"),
}


class IngestError(Exception):
    """A request-level failure: `reason` names a REASONS entry, which gives the status,
    the message (`variant` picks one of its templates, filled from `params`) and headers.
    `retry_after_s` overrides the entry's Retry-After."""

    def __init__(self, reason, variant="message", retry_after_s=None, **params):
        entry = REASONS[reason]
        message = entry.text(variant, params)
        super().__init__(message)
        self.status = entry.status
        self.reason = reason
        self.message = message
        self.headers = entry.headers
        self.retry_after_s = entry.retry_after_s if retry_after_s is None else retry_after_s


class RecordRejected(Exception):
    """One record failed cleaning; the others in the same request still go through.

    `field` names the offending field (`properties.token`), `reason` is the stable label,
    the message comes from the catalogue (`{field}` and `params` fill it in).
    """

    def __init__(self, reason, field=None, variant="message", **params):
        message = REASONS[reason].text(variant, dict(params, field=field))
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


def message(reason, variant="message", **params):
    """The text of a catalogue entry, for answers written outside the app (the HTTP
    parser's error page, nginx's bodies)."""
    return REASONS[reason].text(variant, params)
