"""Kestrel's memcache protocol, client side and shared wire format.

protocol.py holds every wire constant and formatter (used by this client and by the
bundled server in ingest/queue/); errors.py the KestrelError family; cluster.py the
servers, their health and one connection; client.py the pykestrel-style Client.
"""


def __getattr__(name):
    # Lazy so that `import ingest.kestrel.protocol` does not pull in the client's sockets.
    if name == "Client":
        from ingest.kestrel.client import Client
        return Client
    if name == "KestrelError":
        from ingest.kestrel.errors import KestrelError
        return KestrelError
    raise AttributeError(name)
