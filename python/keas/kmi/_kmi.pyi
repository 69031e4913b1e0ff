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

class Facility:
    def __init__(self, storage_dir: str, max_cached_deks: int = 10000,
                 on_fetch: Optional[Callable[[str], Any]] = None) -> None: ...
    def generate(self, bits: int, exponent: int, passphrase: bytes,
                 dek_length: int) -> tuple[str, bytes]: ...
    def dek(self, kek: Buffer, timeout: float, passphrase: bytes,
            dek_length: int) -> bytes: ...
    def encrypt(self, kek: Buffer, data: Buffer, timeout: float,
                passphrase: bytes, dek_length: int, salt: bytes,
                iv: bytes) -> bytes: ...
    def decrypt(self, kek: Buffer, data: Buffer, timeout: float,
                passphrase: bytes, dek_length: int, salt: bytes,
                iv: bytes) -> bytes: ...
    def names(self) -> list[str]: ...
    def read(self, name: str) -> bytes: ...
    def write(self, name: str, data: bytes) -> None: ...
    def remove(self, name: str) -> None: ...
    def contains(self, name: str) -> bool: ...
    def cached_deks(self) -> list[tuple[str, float, bytes]]: ...
    def forget(self, name: Optional[str] = None) -> int: ...
