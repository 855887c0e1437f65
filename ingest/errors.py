"""The project's one error type for requests, and the per-record rejection type.

Stages raise these; only app.py turns them into HTTP responses.  `reason` is a short,
stable string: the same text appears in the verbose error body, the log line and the
metric label, so never build it from input.
"""


class IngestError(Exception):
    """A request-level failure with the HTTP status it maps to."""

    def __init__(self, status, reason, message=None, headers=()):
        super().__init__(message or reason)
        self.status = status
        self.reason = reason
        self.message = message or reason
        self.headers = tuple(headers)


class RecordRejected(Exception):
    """One record failed cleaning; the others in the same request still go through.

    `field` names the offending field (`properties.token`), `reason` is the stable label.
    """

    def __init__(self, reason, field=None, message=None):
        super().__init__(message or reason)
        self.reason = reason
        self.field = field
        self.message = message or reason
