"""The persistent class of the ZODB benchmark.

Both benchmark workers (ours and the reference keas.kmi 3.3.0) import it under
the same name, so a database written by one side can be read by the other.
"""
from keas.kmi.persistent import EncryptedPersistent


class Record(EncryptedPersistent):
    """A small record stored encrypted: a number, a name, bytes and a dict."""

    def __init__(self, number, name, payload, tags):
        self.number = number
        self.name = name
        self.payload = payload
        self.tags = tags
