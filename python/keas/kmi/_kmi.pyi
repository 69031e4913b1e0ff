"""Type stubs for the Rust module keas.kmi._kmi."""
from typing import Any, Optional

Buffer = bytes | bytearray | memoryview

TESTING_KEK: bytes
"""The published 512-bit testing KEK of keas.kmi (unencrypted PKCS#1 PEM)."""

V2_MAGIC: bytes
"""The 8 bytes every v2 message starts with (FORMATS.md 7)."""

class KeyExistsError(ValueError):
    """A different key is stored under that name already: keys are written once."""

def derive_key(dek: Buffer, salt: bytes) -> bytes:
    """The AES-256 key for a DEK (md5-based, as keas.kmi always derived it)."""

def encrypt(key: bytes, iv: bytes, data: Buffer) -> bytes:
    """AES-256-CBC with PKCS#7 padding."""

def decrypt(key: bytes, iv: bytes, data: Buffer) -> bytes:
    """Reverse of encrypt; ValueError on a bad length or padding."""

def encrypt_file(key: bytes, fsrc: Any, fdst: Any, chunksize: int = ...) -> None:
    """Stream fsrc into fdst in the file format (size, IV, CBC, space padding)."""

def decrypt_file(key: bytes, fsrc: Any, fdst: Any, chunksize: int = ...,
                 head: Optional[bytes] = None) -> None:
    """Reverse of encrypt_file; ValueError on a damaged stream. ``head``: bytes
    the caller already read from fsrc."""

def dump_state(state: Any) -> Optional[bytes]:
    """zodbpickle's protocol-2 pickle of a state of builtin values; None otherwise."""

def load_state(data: Any, default: Any) -> Any:
    """The state in a pickle of builtin values; ``default`` for any other pickle."""

def kek_name(kek: Buffer) -> str:
    """md5 hex digest of the KEK bytes: the name of its .dek file."""

def unwrap_dek(kek: Buffer, wrapped: Buffer, passphrase: bytes, dek_length: int) -> bytes:
    """The DEK a KEK unwraps, padding checked (ValueError, never a wrong DEK)."""

class V2Key:
    """The v2 keys of one DEK: seal and open messages and file streams."""
    def __init__(self, dek: Buffer) -> None: ...
    @property
    def kid(self) -> bytes: ...
    def seal(self, data: Buffer, associated_data: Optional[Buffer] = None,
             _salt: Optional[bytes] = None) -> bytes: ...
    def open(self, data: Buffer, associated_data: Optional[Buffer] = None) -> bytes: ...
    def seal_file(self, fsrc: Any, fdst: Any, chunksize: int = ...,
                  associated_data: Optional[Buffer] = None) -> None: ...
    def open_file(self, fsrc: Any, fdst: Any, chunksize: int = ...,
                  associated_data: Optional[Buffer] = None,
                  head: Optional[bytes] = None) -> None: ...

NewKey = tuple[str, bytes, bytes, bytes, bytes]
"""(name, KEK PEM, wrapped DEK, kid, SHA-256 of the KEK's SubjectPublicKeyInfo)."""

class Facility:
    """Key work and the DEK cache of a master facility. ``owner`` is the
    Python facility: its ``timeout``, ``rsaPassphrase``, ``keyLength``,
    ``dataFormat``, ``acceptLegacy``, ``_bytesToKeySalt`` and
    ``initializationVector``, and its ``_fetch(name) -> (wrapped, state)``,
    ``_key_state(name) -> state`` and ``_refuse(name, state, encrypting)``."""
    def __init__(self, max_cached_deks: int = 10000, state_refresh: float = 1.0) -> None: ...
    def generate(self, bits: int, exponent: int, passphrase: bytes,
                 dek_length: int) -> NewKey: ...
    def rewrap(self, owner: Any, old_kek: Buffer) -> NewKey: ...
    def dek(self, owner: Any, kek: Buffer) -> bytes: ...
    def dek_and_state(self, owner: Any, kek: Buffer) -> tuple[bytes, str, str]: ...
    def encrypt(self, owner: Any, kek: Buffer, data: Buffer,
                associated_data: Optional[Buffer] = None) -> bytes: ...
    def decrypt(self, owner: Any, kek: Buffer, data: Buffer,
                associated_data: Optional[Buffer] = None) -> bytes: ...
    def v2key(self, owner: Any, kek: Buffer, encrypting: bool = False) -> V2Key: ...
    def cached_deks(self) -> list[tuple[str, float, bytes]]: ...
    def forget(self, name: Optional[str] = None) -> int: ...

class DekStore:
    def __init__(self, directory: str) -> None: ...
    def names(self) -> list[str]: ...
    def meta_names(self) -> list[str]: ...
    def contains(self, name: str) -> bool: ...
    def get(self, name: str) -> bytes: ...
    def put(self, name: str, data: bytes) -> None: ...
    def get_meta(self, name: str) -> Optional[bytes]: ...
    def put_meta(self, name: str, data: bytes) -> None: ...
    def remove(self, name: str, with_meta: bool = False) -> None: ...
