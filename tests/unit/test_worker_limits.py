"""The worker's start-up check of its descriptor limit against --max-connections.

Importing ingest.worker imports eventlet (not monkey-patched here); its deprecation
banner is silenced as `ingest serve` does."""
import dataclasses
import resource
import warnings

from ingest.config import resolve

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    from ingest.worker import descriptor_warning


def settings(**changes):
    return dataclasses.replace(resolve({}, environ={}), **changes)


def test_max_connections_that_do_not_fit_the_descriptor_limit_are_warned_about():
    s = settings(max_connections=4096, kestrel_pool_size=64, kestrel=("a:1", "b:2"))
    warning = descriptor_warning(s, (1024, 4096))
    assert "--max-connections 4096 needs about 4288 file descriptors" in warning
    assert "the limit is 1024 (hard 4096)" in warning
    assert descriptor_warning(s, (4288, 4288)) is None
    assert descriptor_warning(s, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)) is None
