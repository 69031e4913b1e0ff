"""Type stubs for the Rust module keas.kmi._kmi."""
from typing import Any, Callable, Optional

Buffer = bytes | bytearray | memoryview

TESTING_KEK: bytes
"""The published 512-bit testing KEK of keas.kmi (unencrypted PKCS#1 PEM)."""

def derive_key(dek: Buffer, salt: bytes) -> bytes:
    """The AES-256 key for a DEK (md5-based, as keas.kmi always derived it)."""

def encrypt(key: bytes, iv: bytes, data: Buffer) -> bytes:
    """AES-256-CBC with PKCS#7 padding."""

def decrypt(key: bytes, iv: bytes, data: Buffer) -> bytes:
    """Reverse of encrypt; ValueError on a bad length or padding."""

def encrypt_file(key: bytes, fsrc: Any, fdst: Any, chunksize: int = ...) -> None:
    """Stream fsrc into fdst in the file format (size, IV, CBC, space padding)."""

def decrypt_file(key: bytes, fsrc: Any, fdst: Any, chunksize: int = ...) -> None:
    """Reverse of encrypt_file; ValueError on a damaged stream."""

def dump_state(state: Any) -> Optional[bytes]:
    """zodbpickle's protocol-2 pickle of a state of builtin values; None otherwise."""

def load_state(data: Any, default: Any) -> Any:
    """The state in a pickle of builtin values; ``default`` for any other pickle."""

def kek_name(kek: Buffer) -> str:
    """md5 hex digest of the KEK bytes: the name of its .dek file."""

class KeyExistsError(ValueError):
    """A different key is stored under that name already: keys are written once."""

Fetch = Callable[[str], bytes]
"""Returns the wrapped DEK stored under a name, or raises KeyError."""

class Facility:
    def __init__(self, max_cached_deks: int = 10000) -> None: ...
    def generate(self, bits: int, exponent: int, passphrase: bytes,
                 dek_length: int) -> tuple[str, bytes, bytes]: ...
    def dek(self, kek: Buffer, timeout: float, passphrase: bytes,
            dek_length: int, fetch: Fetch) -> bytes: ...
    def encrypt(self, kek: Buffer, data: Buffer, timeout: float,
                passphrase: bytes, dek_length: int, salt: bytes,
                iv: bytes, fetch: Fetch) -> bytes: ...
    def decrypt(self, kek: Buffer, data: Buffer, timeout: float,
                passphrase: bytes, dek_length: int, salt: bytes,
                iv: bytes, fetch: Fetch) -> bytes: ...
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
