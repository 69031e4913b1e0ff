"""The zope.interface contracts of the key management facilities."""
import zope.interface
import zope.schema
from zope.interface.common import mapping


class IEncryptionService(zope.interface.Interface):
    """Encrypts and decrypts data with the DEK that belongs to a KEK."""

    def encrypt(key, data):
        """Encrypt the bytes ``data`` under the DEK of the KEK ``key``."""

    def decrypt(key, data):
        """Decrypt what ``encrypt`` returned; ValueError if it cannot."""

    def encrypt_file(key, fsrc, fdst, chunksize):
        """Stream the file object ``fsrc`` encrypted into ``fdst``."""

    def decrypt_file(key, fsrc, fdst, chunksize):
        """Stream what ``encrypt_file`` wrote back to plaintext in ``fdst``."""


class IKeyGenerationService(zope.interface.Interface):
    """Makes new key pairs."""

    def generate():
        """Create a KEK and its DEK; keep the wrapped DEK, return the KEK (PEM bytes)."""


class IKeyManagementFacility(IEncryptionService, IKeyGenerationService):
    """Generates keys and encrypts with them."""


class IExtendedKeyManagementFacility(IKeyManagementFacility, mapping.IMapping):
    """A facility whose wrapped DEKs are also reachable as a mapping
    from the md5 hex digest of a KEK to the wrapped DEK."""


class IKeyHolder(zope.interface.Interface):
    """Keeps the one KEK an application encrypts its objects with."""

    key = zope.schema.Bytes(
        title=u'Key',
        description=u'The KEK, as PEM bytes.',
        required=True)
