"""Both sides of Kestrel's memcache protocol: a cluster-aware client and a bundled server."""


def __getattr__(name):
    # Lazy so that `import ingest.kestrel.protocol` does not pull in the client's sockets.
    if name in ("Client", "KestrelError"):
        from ingest.kestrel import client
        return getattr(client, name)
    raise AttributeError(name)
