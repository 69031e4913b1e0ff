"""A key holder utility: one KEK, read from a file and kept in memory."""
from zope.interface import implementer

from keas.kmi.interfaces import IKeyHolder


@implementer(IKeyHolder)
class KeyHolder(object):
    """Holds the KEK stored in ``filename``."""

    def __init__(self, filename):
        with open(filename, 'rb') as f:
            self.key = f.read()
