"""Persistent classes the ZODB tests store (importable, as ZODB needs)."""
import persistent

from keas.kmi.persistent import EncryptedPersistent


class Secret(EncryptedPersistent):
    def __init__(self, name, ssn):
        self.name = name
        self.ssn = ssn


class Plain(persistent.Persistent):
    def __init__(self, password):
        self.password = password
