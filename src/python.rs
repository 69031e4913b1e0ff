//! The pyo3 bindings behind `keas.kmi._kmi`: thin wrappers that convert
//! arguments, release the GIL for slow work, and call the concept modules.

use std::borrow::Cow;
use std::fs::File;
use std::os::fd::BorrowedFd;

use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use zeroize::Zeroizing;

use crate::cipher::{derive_cipher_key, DataCipher, FILE_HEADER};
use crate::errors::KmiError;
use crate::facility::{self, DekPolicy, KekId, KeyState};
use crate::files::{decrypt_file_at, encrypt_file_at, open_file_at, seal_file_at, Moved};
use crate::v2::{self, V2Key};

/// Bulk work below this many bytes keeps the GIL: the hand-off costs more.
const DETACH_BYTES: usize = 64 * 1024;
/// Regular files are read at least this much at a time (fewer system calls).
const FILE_CHUNK: usize = 1 << 20;

/// A new `bytes` of `len` bytes, filled in place by `fill`.
///
/// Unlike `PyBytes::new_with` it does not zero the buffer first: for bulk
/// data that memset costs a third of a decryption.
///
/// With `prefault`, a second thread faults the pages in ahead of a serial
/// `fill` (CBC encryption), so the page faults no longer add to its time.
fn new_bytes<'py>(
    py: Python<'py>,
    len: usize,
    prefault: bool,
    fill: impl FnOnce(&mut [u8]) -> PyResult<()>,
) -> PyResult<Bound<'py, PyBytes>> {
    let size = isize::try_from(len).map_err(|_| KmiError::BadArgument("data too large".into()))?;
    // SAFETY: PyBytes_FromStringAndSize(NULL, n) returns a new, unshared
    // bytes object (or NULL with an exception set) whose buffer holds n
    // bytes plus a NUL. `fill` writes the whole buffer before anything reads
    // it: every caller passes a cipher routine that writes each output byte.
    // The object is only handed out after `fill` succeeded. madvise only
    // advises the kernel about (or maps) pages inside that buffer; it neither
    // reads nor changes their contents, so it may run beside `fill`.
    unsafe {
        let obj = pyo3::Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size),
        )?;
        let buf = pyo3::ffi::PyBytes_AsString(obj.as_ptr()) as *mut u8;
        let range = huge_page_range(buf, len);
        if let Some((start, size)) = range {
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        let out = std::slice::from_raw_parts_mut(buf, len);
        match range.filter(|_| prefault) {
            Some((start, size)) => std::thread::scope(|scope| {
                // MADV_POPULATE_WRITE (Linux 5.14+) maps the pages without
                // touching their contents; on older kernels it fails harmlessly.
                scope.spawn(move || {
                    libc::madvise(start as *mut libc::c_void, size, libc::MADV_POPULATE_WRITE)
                });
                fill(out)
            })?,
            None => fill(out)?,
        }
        Ok(obj.cast_into_unchecked())
    }
}

/// The 2 MiB-aligned part of a large buffer, where transparent huge pages
/// can back it: a fresh 64 MiB `bytes` costs 16384 page faults on its first
/// write, which take longer than decrypting into it; huge pages make that 32.
fn huge_page_range(buf: *mut u8, len: usize) -> Option<(usize, usize)> {
    const HUGE: usize = 2 << 20;
    if len < 4 * HUGE {
        return None;
    }
    let start = (buf as usize).next_multiple_of(HUGE);
    let end = (buf as usize + len) / HUGE * HUGE;
    (end > start).then(|| (start, end - start))
}

/// The file behind `f` when it is a binary file object on a regular file that
/// positional I/O may read (or, with `write`, overwrite in place): a
/// duplicate of its descriptor, owned by us.
fn regular_file(f: &Bound<'_, PyAny>, write: bool) -> PyResult<Option<File>> {
    let io = f.py().import("io")?;
    let kinds = (
        io.getattr("BufferedReader")?,
        io.getattr("BufferedWriter")?,
        io.getattr("BufferedRandom")?,
        io.getattr("FileIO")?,
    );
    if !f.is_instance(kinds.into_pyobject(f.py())?.as_any())? {
        return Ok(None);
    }
    if write && f.getattr("mode")?.extract::<String>()?.contains('a') {
        return Ok(None); // O_APPEND ignores positions
    }
    let Ok(fd) = f.call_method0("fileno").and_then(|fd| fd.extract::<i32>()) else {
        return Ok(None);
    };
    // SAFETY: `fd` is the open descriptor of the live file object `f`, which
    // we hold (with the GIL) while we duplicate it; the duplicate is ours.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    let file = File::from(owned);
    Ok(file.metadata()?.is_file().then_some(file))
}

/// Bytes-like input: bytes are borrowed, bytearray and memoryview copied.
fn bytes_like<'a>(obj: &'a Bound<'_, PyAny>, what: &str) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Cow::Owned(b.to_vec()));
    }
    if obj.is_instance_of::<PyString>() || !obj.hasattr("tobytes")? {
        return Err(PyTypeError::new_err(format!(
            "{what} must be bytes-like, not {}",
            obj.get_type().name()?
        )));
    }
    let b = obj.call_method0("tobytes")?;
    Ok(Cow::Owned(b.cast::<PyBytes>()?.as_bytes().to_vec()))
}

fn cipher_from_key(key: &[u8]) -> PyResult<DataCipher> {
    let key: &[u8; 32] = key.try_into().map_err(|_| {
        KmiError::BadArgument(format!("cipher key must be 32 bytes, not {}", key.len()))
    })?;
    Ok(DataCipher::new(key))
}

fn encrypt_bytes<'py>(
    py: Python<'py>,
    cipher: &DataCipher,
    iv: &[u8],
    data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let len = DataCipher::padded_len(data.len());
    new_bytes(py, len, true, |out| {
        if data.len() >= DETACH_BYTES {
            py.detach(|| cipher.encrypt_into(iv, data, out))?;
        } else {
            cipher.encrypt_into(iv, data, out)?;
        }
        Ok(())
    })
}

fn decrypt_bytes<'py>(
    py: Python<'py>,
    cipher: &DataCipher,
    iv: &[u8],
    data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let len = cipher.plaintext_len(iv, data)?;
    // Decryption runs on every core already; each faults its own pages.
    new_bytes(py, len, false, |out| {
        if data.len() >= DETACH_BYTES {
            py.detach(|| cipher.decrypt_into(iv, data, out))?;
        } else {
            cipher.decrypt_into(iv, data, out)?;
        }
        Ok(())
    })
}

/// `md5(dek + salt) + md5(md5(dek + salt) + dek + salt)`: the AES-256 key for a DEK.
#[pyfunction]
fn derive_key<'py>(
    py: Python<'py>,
    dek: &Bound<'py, PyAny>,
    salt: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let key = derive_cipher_key(&bytes_like(dek, "dek")?, salt)?;
    Ok(PyBytes::new(py, &*key))
}

/// AES-256-CBC with PKCS#7 padding under a derived key.
#[pyfunction]
fn encrypt<'py>(
    py: Python<'py>,
    key: &[u8],
    iv: &[u8],
    data: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    encrypt_bytes(py, &cipher_from_key(key)?, iv, &bytes_like(data, "data")?)
}

#[pyfunction]
fn decrypt<'py>(
    py: Python<'py>,
    key: &[u8],
    iv: &[u8],
    data: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    decrypt_bytes(py, &cipher_from_key(key)?, iv, &bytes_like(data, "data")?)
}

/// Unwrap a stored DEK with its KEK, locally (a client in wrapped mode):
/// the padding and length are checked, so a damaged one is a ValueError,
/// never a wrong DEK.
#[pyfunction]
fn unwrap_dek<'py>(
    py: Python<'py>,
    kek: &Bound<'py, PyAny>,
    wrapped: &Bound<'py, PyAny>,
    passphrase: &[u8],
    dek_length: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let kek = bytes_like(kek, "key")?;
    let wrapped = bytes_like(wrapped, "wrapped DEK")?;
    let name = facility::kek_name(&kek);
    let policy = DekPolicy {
        timeout: 0.0,
        passphrase,
        dek_length,
    };
    let dek = py.detach(|| facility::unwrap_with(&kek, &name, &wrapped, &policy))?;
    Ok(PyBytes::new(py, &dek))
}

/// The md5 hex digest naming a KEK's `.dek` file.
#[pyfunction]
fn kek_name(kek: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(facility::kek_name(&bytes_like(kek, "key")?))
}

/// Read `n` bytes, or fewer only at end of stream (pipes return short reads).
fn read_full(src: &Bound<'_, PyAny>, n: usize) -> PyResult<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        let chunk = src.call_method1("read", (n - buf.len(),))?;
        let chunk = bytes_like(&chunk, "data read from fsrc")?;
        if chunk.is_empty() {
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn run<T: Send>(py: Python<'_>, big: bool, f: impl FnOnce() -> T + Send) -> T {
    if big {
        py.detach(f)
    } else {
        f()
    }
}

/// Run `op` with positional I/O when both `fsrc` and `fdst` are regular
/// files, GIL released, then leave both file objects positioned after what
/// was read and written. Returns false (doing nothing) for other streams.
fn between_files(
    py: Python<'_>,
    fsrc: &Bound<'_, PyAny>,
    fdst: &Bound<'_, PyAny>,
    chunksize: usize,
    op: impl FnOnce(&File, u64, &File, u64, usize) -> crate::errors::KmiResult<Moved> + Send,
) -> PyResult<bool> {
    let (Some(src), Some(dst)) = (regular_file(fsrc, false)?, regular_file(fdst, true)?) else {
        return Ok(false);
    };
    let src_off: u64 = fsrc.call_method0("tell")?.extract()?;
    fdst.call_method0("flush")?;
    let dst_off: u64 = fdst.call_method0("tell")?.extract()?;
    let chunk = chunksize.max(FILE_CHUNK);
    let moved = py.detach(|| op(&src, src_off, &dst, dst_off, chunk))?;
    fsrc.call_method1("seek", (src_off + moved.read,))?;
    fdst.call_method1("seek", (dst_off + moved.written,))?;
    Ok(true)
}

/// Stream `fsrc` into `fdst` in the keas.kmi file format (size, IV, AES-256-CBC, space padding).
#[pyfunction]
#[pyo3(signature = (key, fsrc, fdst, chunksize = 24 * 1024))]
fn encrypt_file(
    py: Python<'_>,
    key: &[u8],
    fsrc: &Bound<'_, PyAny>,
    fdst: &Bound<'_, PyAny>,
    chunksize: usize,
) -> PyResult<()> {
    let cipher = cipher_from_key(key)?;
    let chunksize = chunksize.max(1);
    let mut iv = [0u8; 16];
    getrandom::fill(&mut iv).map_err(|e| PyErr::from(std::io::Error::other(e)))?;
    let encrypt_at = |src: &File, src_off, dst: &File, dst_off, chunk| {
        encrypt_file_at(&cipher, &iv, src, src_off, dst, dst_off, chunk)
    };
    if between_files(py, fsrc, fdst, chunksize, encrypt_at)? {
        return Ok(());
    }
    let mut enc = cipher.file_encryptor(&iv)?;
    let start = fdst.call_method0("tell")?;
    let mut header = [0u8; FILE_HEADER];
    header[8..].copy_from_slice(&iv);
    fdst.call_method1("write", (PyBytes::new(py, &header),))?;
    let mut out = Vec::with_capacity(chunksize + 16);
    loop {
        let chunk = read_full(fsrc, chunksize)?;
        if chunk.is_empty() {
            break;
        }
        out.clear();
        run(py, chunk.len() >= DETACH_BYTES, || {
            enc.update(&chunk, &mut out)
        });
        if !out.is_empty() {
            fdst.call_method1("write", (PyBytes::new(py, &out),))?;
        }
    }
    out.clear();
    let size = enc.finish(&mut out);
    if !out.is_empty() {
        fdst.call_method1("write", (PyBytes::new(py, &out),))?;
    }
    let end = fdst.call_method0("tell")?;
    fdst.call_method1("seek", (start,))?;
    fdst.call_method1("write", (PyBytes::new(py, &size.to_le_bytes()),))?;
    fdst.call_method1("seek", (end,))?;
    Ok(())
}

/// Reverse of `encrypt_file`: writes exactly the original size of plaintext to `fdst`.
#[pyfunction]
/// `head` is what the caller already read from `fsrc` (to tell the formats apart).
#[pyo3(signature = (key, fsrc, fdst, chunksize = 24 * 1024, head = None))]
fn decrypt_file(
    py: Python<'_>,
    key: &[u8],
    fsrc: &Bound<'_, PyAny>,
    fdst: &Bound<'_, PyAny>,
    chunksize: usize,
    head: Option<&[u8]>,
) -> PyResult<()> {
    let cipher = cipher_from_key(key)?;
    let chunksize = chunksize.max(1);
    let head = head.unwrap_or_default();
    let decrypt_at = |src: &File, src_off, dst: &File, dst_off, chunk| {
        decrypt_file_at(&cipher, src, src_off, dst, dst_off, chunk)
    };
    if head.is_empty() && between_files(py, fsrc, fdst, chunksize, decrypt_at)? {
        return Ok(());
    }
    let mut header = head.to_vec();
    header.extend(read_full(fsrc, FILE_HEADER.saturating_sub(head.len()))?);
    let mut dec = cipher.file_decryptor(&header)?;
    let mut out = Vec::with_capacity(chunksize + 16);
    loop {
        let chunk = read_full(fsrc, chunksize)?;
        if chunk.is_empty() {
            break;
        }
        out.clear();
        run(py, chunk.len() >= DETACH_BYTES, || {
            dec.update(&chunk, &mut out)
        })?;
        if !out.is_empty() {
            fdst.call_method1("write", (PyBytes::new(py, &out),))?;
        }
    }
    dec.finish()?;
    Ok(())
}

/// The v2 keys of one DEK (FORMATS.md 7): seal and open messages and file
/// streams. Derived once per DEK; holds no DEK, only what HKDF made of it.
#[pyclass(frozen, module = "keas.kmi._kmi", name = "V2Key")]
struct PyV2Key {
    inner: std::sync::Arc<V2Key>,
}

#[pymethods]
impl PyV2Key {
    #[new]
    fn new(dek: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PyV2Key {
            inner: std::sync::Arc::new(V2Key::new(&bytes_like(dek, "dek")?)),
        })
    }

    /// The 16 bytes that name the DEK in every message sealed under it.
    #[getter]
    fn kid<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.kid())
    }

    /// Seal `data`; `_salt` fixes the salt, for known-answer tests only.
    #[pyo3(signature = (data, associated_data = None, _salt = None))]
    fn seal<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        associated_data: Option<&Bound<'py, PyAny>>,
        _salt: Option<&[u8]>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let salt = match _salt {
            Some(s) => s
                .try_into()
                .map_err(|_| KmiError::BadArgument("a v2 salt is 24 bytes".into()))?,
            None => v2::fresh_salt()?,
        };
        seal_bytes(
            py,
            &self.inner,
            &salt,
            &bytes_like(data, "data")?,
            associated_data,
        )
    }

    /// Open what `seal` made; ValueError, saying why, for anything else.
    #[pyo3(signature = (data, associated_data = None))]
    fn open<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        associated_data: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        open_bytes(py, &self.inner, &bytes_like(data, "data")?, associated_data)
    }

    /// Seal the stream `fsrc` into `fdst` at its position.
    #[pyo3(signature = (fsrc, fdst, chunksize = 24 * 1024, associated_data = None))]
    fn seal_file(
        &self,
        py: Python<'_>,
        fsrc: &Bound<'_, PyAny>,
        fdst: &Bound<'_, PyAny>,
        chunksize: usize,
        associated_data: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let ad = optional_bytes(associated_data, "associated_data")?;
        let key = &self.inner;
        let seal_at = |src: &File, src_off, dst: &File, dst_off, chunk| {
            seal_file_at(key, &ad, src, src_off, dst, dst_off, chunk)
        };
        let chunksize = chunksize.max(1);
        if between_files(py, fsrc, fdst, chunksize, seal_at)? {
            return Ok(());
        }
        let mut sealer = key.sealer(&ad)?;
        fdst.call_method1("write", (PyBytes::new(py, sealer.header()),))?;
        let mut out = Vec::with_capacity(chunksize + v2::SEALED_CHUNK);
        loop {
            let chunk = read_full(fsrc, chunksize)?;
            out.clear();
            if chunk.is_empty() {
                sealer.finish(&mut out)?;
            } else {
                run(py, chunk.len() >= DETACH_BYTES, || {
                    sealer.update(&chunk, &mut out)
                })?;
            }
            if !out.is_empty() {
                fdst.call_method1("write", (PyBytes::new(py, &out),))?;
            }
            if chunk.is_empty() {
                return Ok(());
            }
        }
    }

    /// Open a v2 stream from `fsrc` into `fdst`. `head` is what the caller
    /// already read from `fsrc` (to tell the formats apart). Only verified
    /// chunks are written; the caller truncates `fdst` if this fails.
    #[pyo3(signature = (fsrc, fdst, chunksize = 24 * 1024, associated_data = None, head = None))]
    fn open_file(
        &self,
        py: Python<'_>,
        fsrc: &Bound<'_, PyAny>,
        fdst: &Bound<'_, PyAny>,
        chunksize: usize,
        associated_data: Option<&Bound<'_, PyAny>>,
        head: Option<&[u8]>,
    ) -> PyResult<()> {
        let ad = optional_bytes(associated_data, "associated_data")?;
        let key = &self.inner;
        let chunksize = chunksize.max(1);
        let head = head.unwrap_or_default();
        if head.is_empty() {
            let open_at = |src: &File, src_off, dst: &File, dst_off, chunk| {
                open_file_at(key, &ad, src, src_off, dst, dst_off, chunk)
            };
            if between_files(py, fsrc, fdst, chunksize, open_at)? {
                return Ok(());
            }
        }
        let mut opener = key.opener(&ad);
        let mut out = Vec::with_capacity(chunksize + v2::CHUNK);
        opener.update(head, &mut out)?;
        loop {
            let chunk = read_full(fsrc, chunksize)?;
            if chunk.is_empty() {
                opener.finish(&mut out)?;
            } else {
                run(py, chunk.len() >= DETACH_BYTES, || {
                    opener.update(&chunk, &mut out)
                })?;
            }
            if !out.is_empty() {
                fdst.call_method1("write", (PyBytes::new(py, &out),))?;
                out.clear();
            }
            if chunk.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Associated data needs the v2 format: the legacy one cannot bind it.
fn refuse_legacy_with(associated_data: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    if !optional_bytes(associated_data, "associated_data")?.is_empty() {
        return Err(KmiError::BadArgument(
            "associated data needs the v2 format (dataFormat = 2); the legacy format cannot bind it"
                .into(),
        )
        .into());
    }
    Ok(())
}

fn seal_bytes<'py>(
    py: Python<'py>,
    key: &V2Key,
    salt: &[u8; v2::SALT_LEN],
    data: &[u8],
    associated_data: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let ad = optional_bytes(associated_data, "associated_data")?;
    let len = v2::sealed_len(data.len() as u64)? as usize;
    new_bytes(py, len, false, |out| {
        run(py, data.len() >= DETACH_BYTES, || {
            key.seal_into(salt, &ad, data, out)
        })?;
        Ok(())
    })
}

fn open_bytes<'py>(
    py: Python<'py>,
    key: &V2Key,
    data: &[u8],
    associated_data: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let ad = optional_bytes(associated_data, "associated_data")?;
    let len = key.opened_len(data)?;
    new_bytes(py, len, false, |out| {
        run(py, data.len() >= DETACH_BYTES, || {
            key.open_into(data, &ad, out)
        })?;
        Ok(())
    })
}

fn optional_bytes<'a>(obj: Option<&'a Bound<'_, PyAny>>, what: &str) -> PyResult<Cow<'a, [u8]>> {
    match obj {
        None => Ok(Cow::Borrowed(&[])),
        Some(o) if o.is_none() => Ok(Cow::Borrowed(&[])),
        Some(o) => bytes_like(o, what),
    }
}

/// The master facility's key work and DEK cache. Every method takes
/// `owner`, the Python facility: its (overridable) `timeout` is read on each
/// call; `rsaPassphrase`, `keyLength` and its `_fetch(name)` (the wrapped DEK
/// stored under a name, or `KeyError`) only when the DEK is not cached.
#[pyclass(frozen, module = "keas.kmi._kmi")]
struct Facility {
    inner: facility::Facility,
    /// Seconds a cached key state stays trusted before it is read again.
    state_refresh: f64,
}

/// The DEK cache's handle on a KEK: its bytes and Python's hash of them,
/// which a `bytes` object computes once and keeps (so warm calls with the
/// same object do not hash its ~1.7 KB again).
fn kek_id<'a>(kek: &Bound<'_, PyAny>, bytes: &'a [u8]) -> PyResult<KekId<'a>> {
    let hash = if kek.is_exact_instance_of::<PyBytes>() {
        kek.hash()?
    } else {
        // bytearray, memoryview: hashed as the bytes object they equal.
        PyBytes::new(kek.py(), bytes).hash()?
    };
    Ok(KekId::hashed(bytes, hash as u64))
}

/// A use its key's state does not allow: the owner's exception, or `Ok`
/// when the owner makes an exception (`_refuse` returns None: a re-encryption
/// told to read a compromised key).
fn refusal(
    owner: &Bound<'_, PyAny>,
    name: &str,
    state: KeyState,
    encrypting: bool,
) -> PyResult<()> {
    let error = owner.call_method1(
        intern!(owner.py(), "_refuse"),
        (name, state.as_str(), encrypting),
    )?;
    if error.is_none() {
        return Ok(());
    }
    Err(PyErr::from_value(error))
}

type NewKey<'py> = (
    String,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
);

fn new_key(py: Python<'_>, new: facility::Generated) -> NewKey<'_> {
    (
        new.name,
        PyBytes::new(py, &new.pem),
        PyBytes::new(py, &new.wrapped),
        PyBytes::new(py, &new.kid),
        PyBytes::new(py, &new.fingerprint),
    )
}

fn owner_timeout(owner: &Bound<'_, PyAny>) -> PyResult<f64> {
    owner.getattr(intern!(owner.py(), "timeout"))?.extract()
}

/// `rsaPassphrase` as bytes: str is Latin-1 when it can be (as PyCrypto read it), else UTF-8.
fn owner_passphrase(owner: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let value = owner.getattr(intern!(owner.py(), "rsaPassphrase"))?;
    if value.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(text) = value.cast::<PyString>() {
        let text = text.to_cow()?;
        return Ok(if text.chars().all(|c| (c as u32) < 256) {
            text.chars().map(|c| c as u8).collect()
        } else {
            text.as_bytes().to_vec()
        });
    }
    Ok(bytes_like(&value, "rsaPassphrase")?.into_owned())
}

/// A stored key, fetched by name through the owner (`_fetch`): its wrapped
/// DEK and state, with the owner's settings for unwrapping it.
struct Stored {
    wrapped: Vec<u8>,
    state: KeyState,
    passphrase: Zeroizing<Vec<u8>>,
    dek_length: usize,
}

impl Stored {
    /// Refused (the owner's exception) unless the key's state allows the use.
    fn fetch(owner: &Bound<'_, PyAny>, name: &str, encrypting: bool) -> PyResult<Stored> {
        let py = owner.py();
        let fetched = owner.call_method1(intern!(py, "_fetch"), (name,))?;
        let (wrapped, state): (Bound<'_, PyAny>, String) = fetched.extract()?;
        let state = KeyState::parse(&state)?;
        if !state.allows(encrypting) {
            refusal(owner, name, state, encrypting)?;
        }
        Ok(Stored {
            wrapped: bytes_like(&wrapped, "wrapped DEK")?.into_owned(),
            state,
            passphrase: Zeroizing::new(owner_passphrase(owner)?),
            dek_length: owner.getattr(intern!(py, "keyLength"))?.extract()?,
        })
    }

    fn policy(&self, timeout: f64) -> DekPolicy<'_> {
        DekPolicy {
            timeout,
            passphrase: &self.passphrase,
            dek_length: self.dek_length,
        }
    }
}

impl Facility {
    /// The DEK for `kek`: cached, or fetched by name through the owner and
    /// unwrapped (GIL released); refused unless the key's state allows it
    /// (to encrypt, with `encrypting`).
    fn dek_or_fetch(
        &self,
        py: Python<'_>,
        owner: &Bound<'_, PyAny>,
        kek: KekId<'_>,
        timeout: f64,
        encrypting: bool,
    ) -> PyResult<(Zeroizing<Vec<u8>>, KeyState)> {
        if let Some((dek, check)) = self.inner.cached_dek(kek, timeout, self.state_refresh) {
            let state = self.check_state(py, owner, kek, check, encrypting)?;
            return Ok((dek, state));
        }
        // The stored DEK comes first: an unknown KEK is a KeyError without parsing it.
        let name = facility::kek_name(kek.bytes);
        let stored = Stored::fetch(owner, &name, encrypting)?;
        let policy = stored.policy(timeout);
        let state = stored.state;
        let dek = py.detach(|| {
            self.inner
                .unwrap(kek, &name, &stored.wrapped, &policy, state)
        })?;
        Ok((dek, state))
    }

    /// The state of a cached key (read again from the owner's store when
    /// `check` says it is due), refused unless it allows the use.
    fn check_state(
        &self,
        py: Python<'_>,
        owner: &Bound<'_, PyAny>,
        kek: KekId<'_>,
        check: facility::StateCheck,
        encrypting: bool,
    ) -> PyResult<KeyState> {
        let state = match check {
            Ok(state) => state,
            Err(name) => {
                let text: String = owner
                    .call_method1(intern!(py, "_key_state"), (&name,))?
                    .extract()?;
                let state = KeyState::parse(&text)?;
                self.inner.set_state(kek, state);
                state
            }
        };
        if !state.allows(encrypting) {
            refusal(owner, &facility::kek_name(kek.bytes), state, encrypting)?;
        }
        Ok(state)
    }

    fn v2_key(
        &self,
        py: Python<'_>,
        owner: &Bound<'_, PyAny>,
        kek: KekId<'_>,
        encrypting: bool,
    ) -> PyResult<std::sync::Arc<V2Key>> {
        let timeout = owner_timeout(owner)?;
        if let Some((key, check)) = self.inner.cached_v2(kek, timeout, self.state_refresh) {
            self.check_state(py, owner, kek, check, encrypting)?;
            return Ok(key);
        }
        let (dek, _) = self.dek_or_fetch(py, owner, kek, timeout, encrypting)?;
        // Cached now, unless the timeout is zero: then derive it for this call.
        Ok(self
            .inner
            .cached_v2(kek, f64::INFINITY, f64::INFINITY)
            .map(|(key, _)| key)
            .unwrap_or_else(|| std::sync::Arc::new(V2Key::new(&dek))))
    }

    /// The legacy cipher for `kek` and the owner's `_bytesToKeySalt`, and its IV.
    fn cipher(
        &self,
        py: Python<'_>,
        owner: &Bound<'_, PyAny>,
        kek: KekId<'_>,
        encrypting: bool,
    ) -> PyResult<(std::sync::Arc<DataCipher>, Vec<u8>)> {
        let timeout = owner_timeout(owner)?;
        let salt = owner.getattr(intern!(py, "_bytesToKeySalt"))?;
        let salt = bytes_like(&salt, "_bytesToKeySalt")?;
        let iv = owner.getattr(intern!(py, "initializationVector"))?;
        let iv = bytes_like(&iv, "initializationVector")?.into_owned();
        if let Some((cipher, check)) =
            self.inner
                .cached_cipher(kek, timeout, &salt, self.state_refresh)?
        {
            self.check_state(py, owner, kek, check, encrypting)?;
            return Ok((cipher, iv));
        }
        let (dek, _) = self.dek_or_fetch(py, owner, kek, timeout, encrypting)?;
        Ok((self.inner.remember_cipher(kek, &dek, &salt)?, iv))
    }
}

#[pymethods]
impl Facility {
    #[new]
    #[pyo3(signature = (max_cached_deks = 10_000, state_refresh = 1.0))]
    fn new(max_cached_deks: usize, state_refresh: f64) -> Self {
        Facility {
            inner: facility::Facility::new(max_cached_deks),
            state_refresh,
        }
    }

    /// Generate a KEK and wrap a new DEK: (name, KEK PEM, wrapped DEK, kid,
    /// SHA-256 of the KEK's public key).
    fn generate<'py>(
        &self,
        py: Python<'py>,
        bits: usize,
        exponent: u64,
        passphrase: &[u8],
        dek_length: usize,
    ) -> PyResult<NewKey<'py>> {
        let new = py.detach(|| self.inner.generate(bits, exponent, passphrase, dek_length))?;
        Ok(new_key(py, new))
    }

    /// The DEK of `old_kek` wrapped under a new KEK of the same size: as
    /// `generate`. The old key's state must allow serving its DEK.
    fn rewrap<'py>(
        &self,
        py: Python<'py>,
        owner: &Bound<'py, PyAny>,
        old_kek: &Bound<'py, PyAny>,
    ) -> PyResult<NewKey<'py>> {
        let old_kek = bytes_like(old_kek, "key")?;
        let name = facility::kek_name(&old_kek);
        let stored = Stored::fetch(owner, &name, false)?;
        let policy = stored.policy(0.0);
        let exponent: u64 = owner.getattr(intern!(py, "rsaKeyExponent"))?.extract()?;
        let new = py.detach(|| {
            self.inner
                .rewrap(&old_kek, &name, &stored.wrapped, &policy, exponent)
        })?;
        Ok(new_key(py, new))
    }

    /// The DEK for a KEK, cached for the owner's `timeout` seconds.
    fn dek<'py>(
        &self,
        py: Python<'py>,
        owner: &Bound<'py, PyAny>,
        kek: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let timeout = owner_timeout(owner)?;
        let bytes = bytes_like(kek, "key")?;
        let id = kek_id(kek, &bytes)?;
        let (dek, _) = self.dek_or_fetch(py, owner, id, timeout, false)?;
        Ok(PyBytes::new(py, &dek))
    }

    /// `dek`, the state of its key (what the server tells clients), its v2
    /// kid and its name (what the audit log records).
    fn dek_and_state<'py>(
        &self,
        py: Python<'py>,
        owner: &Bound<'py, PyAny>,
        kek: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyBytes>, &'static str, String, String)> {
        let bytes = bytes_like(kek, "key")?;
        let kek = kek_id(kek, &bytes)?;
        let timeout = owner_timeout(owner)?;
        if let Some(((dek, v2, name), check)) =
            self.inner.cached_serving(kek, timeout, self.state_refresh)
        {
            let state = self.check_state(py, owner, kek, check, false)?;
            let kid = hex::encode(v2.kid());
            return Ok((PyBytes::new(py, &dek), state.as_str(), kid, name));
        }
        let (dek, state) = self.dek_or_fetch(py, owner, kek, timeout, false)?;
        let kid = hex::encode(V2Key::new(&dek).kid());
        Ok((
            PyBytes::new(py, &dek),
            state.as_str(),
            kid,
            facility::kek_name(kek.bytes),
        ))
    }

    /// `encrypt` in the owner's `dataFormat`: 1, legacy AES-256-CBC
    /// (FORMATS.md 3), which takes no associated data; 2, v2 (section 7).
    #[pyo3(signature = (owner, kek, data, associated_data = None))]
    fn encrypt<'py>(
        &self,
        py: Python<'py>,
        owner: &Bound<'py, PyAny>,
        kek: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        associated_data: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = bytes_like(kek, "key")?;
        let kek = kek_id(kek, &bytes)?;
        let format = owner.getattr(intern!(py, "dataFormat"))?;
        match format.extract::<i64>() {
            Ok(2) => {
                let key = self.v2_key(py, owner, kek, true)?;
                let data = bytes_like(data, "data")?;
                return seal_bytes(py, &key, &v2::fresh_salt()?, &data, associated_data);
            }
            Ok(1) => {}
            _ => {
                return Err(KmiError::BadArgument(format!(
                    "dataFormat must be 1 (legacy) or 2 (v2), not {}",
                    format.repr()?
                ))
                .into())
            }
        }
        refuse_legacy_with(associated_data)?;
        let (cipher, iv) = self.cipher(py, owner, kek, true)?;
        encrypt_bytes(py, &cipher, &iv, &bytes_like(data, "data")?)
    }

    /// `decrypt` of either format, told apart by the v2 magic (FORMATS.md 7
    /// "Reading"); legacy data only while the owner's `acceptLegacy` is true.
    #[pyo3(signature = (owner, kek, data, associated_data = None))]
    fn decrypt<'py>(
        &self,
        py: Python<'py>,
        owner: &Bound<'py, PyAny>,
        kek: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        associated_data: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = bytes_like(kek, "key")?;
        let kek = kek_id(kek, &bytes)?;
        let data = bytes_like(data, "data")?;
        if v2::is_v2(&data) {
            let key = self.v2_key(py, owner, kek, false)?;
            return open_bytes(py, &key, &data, associated_data);
        }
        refuse_legacy_with(associated_data)?;
        if !owner.getattr(intern!(py, "acceptLegacy"))?.is_truthy()? {
            return Err(KmiError::bad_data(
                "legacy (unauthenticated) data refused: acceptLegacy is False",
            )
            .into());
        }
        let (cipher, iv) = self.cipher(py, owner, kek, false)?;
        decrypt_bytes(py, &cipher, &iv, &data)
    }

    /// The v2 keys of the DEK for a KEK (to encrypt, with `encrypting`).
    #[pyo3(signature = (owner, kek, encrypting = false))]
    fn v2key(
        &self,
        py: Python<'_>,
        owner: &Bound<'_, PyAny>,
        kek: &Bound<'_, PyAny>,
        encrypting: bool,
    ) -> PyResult<PyV2Key> {
        let bytes = bytes_like(kek, "key")?;
        let inner = self.v2_key(py, owner, kek_id(kek, &bytes)?, encrypting)?;
        Ok(PyV2Key { inner })
    }

    /// A snapshot of the DEK cache as (name, fetch time, DEK) triples.
    fn cached_deks<'py>(&self, py: Python<'py>) -> Vec<(String, f64, Bound<'py, PyBytes>)> {
        self.inner
            .cached_deks()
            .into_iter()
            .map(|(name, t, dek): (String, f64, Zeroizing<Vec<u8>>)| {
                (name, t, PyBytes::new(py, &dek))
            })
            .collect()
    }

    /// Drop cached DEKs with this name, or all; returns how many.
    #[pyo3(signature = (name = None))]
    fn forget(&self, name: Option<&str>) -> usize {
        self.inner.forget(name)
    }
}

/// The audit log's file (`keas.kmi.audit.FileAuditLog` wraps it). `append`
/// keeps the GIL: it is a few microseconds of system calls, and releasing
/// the GIL in them made a server's threads queue on each other.
#[pyclass(frozen, module = "keas.kmi._kmi")]
struct AuditFile {
    inner: crate::audit::AuditFile,
}

#[pymethods]
impl AuditFile {
    #[new]
    fn new(path: std::path::PathBuf) -> Self {
        AuditFile {
            inner: crate::audit::AuditFile::new(path),
        }
    }

    /// Append an entry (its fields' JSON); (seq, prev, hash). OSError if it cannot.
    fn append(&self, body: &str, sync: bool) -> PyResult<(u64, String, String)> {
        Ok(self.inner.append(body, sync)?)
    }

    /// fsync the entries appended since the last (GIL released).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.flush())?)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.close())?)
    }
}

/// The storage directory: `<name>.dek` files written once, `<name>.meta`
/// sidecars replaced atomically (`keas.kmi.store.DirectoryStore` wraps it).
#[pyclass(frozen, module = "keas.kmi._kmi")]
struct DekStore {
    inner: crate::store::DekStore,
}

#[pymethods]
impl DekStore {
    #[new]
    fn new(py: Python<'_>, directory: &str) -> PyResult<Self> {
        let inner = py.detach(|| crate::store::DekStore::open(directory))?;
        Ok(DekStore { inner })
    }

    fn names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(py.detach(|| self.inner.names())?)
    }

    fn meta_names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(py.detach(|| self.inner.meta_names())?)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn get<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.inner.get(name)?;
        Ok(PyBytes::new(py, &data))
    }

    /// Store a wrapped DEK durably, once (`KeyExistsError` for other bytes under the name).
    fn put(&self, py: Python<'_>, name: &str, data: &[u8]) -> PyResult<()> {
        Ok(py.detach(|| self.inner.put(name, data))?)
    }

    fn get_meta<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Bound<'py, PyBytes>>> {
        Ok(self.inner.get_meta(name)?.map(|d| PyBytes::new(py, &d)))
    }

    fn put_meta(&self, py: Python<'_>, name: &str, data: &[u8]) -> PyResult<()> {
        Ok(py.detach(|| self.inner.put_meta(name, data))?)
    }

    #[pyo3(signature = (name, with_meta = false))]
    fn remove(&self, py: Python<'_>, name: &str, with_meta: bool) -> PyResult<()> {
        Ok(py.detach(|| self.inner.remove(name, with_meta))?)
    }
}

/// The protocol-2 pickle of an `EncryptedPersistent` state made of builtin
/// values only, byte for byte as zodbpickle writes it; `None` otherwise.
#[pyfunction]
fn dump_state<'py>(py: Python<'py>, state: &Bound<'py, PyAny>) -> Option<Bound<'py, PyBytes>> {
    crate::state::dump(state).map(|data| PyBytes::new(py, &data))
}

/// The state in a pickle that `dump_state` could have written; `default`
/// for any other pickle (zodbpickle then reads it).
#[pyfunction]
fn load_state<'py>(data: &Bound<'py, PyAny>, default: Bound<'py, PyAny>) -> Bound<'py, PyAny> {
    match data.cast_exact::<PyBytes>() {
        Ok(bytes) => crate::state::load(data.py(), bytes.as_bytes()).unwrap_or(default),
        Err(_) => default,
    }
}

#[pymodule(gil_used = false)]
fn _kmi(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Facility>()?;
    m.add_class::<DekStore>()?;
    m.add_class::<AuditFile>()?;
    m.add_class::<PyV2Key>()?;
    m.add("V2_MAGIC", PyBytes::new(m.py(), &v2::MAGIC))?;
    m.add(
        "KeyExistsError",
        m.py().get_type::<crate::errors::KeyExistsError>(),
    )?;
    m.add_function(wrap_pyfunction!(derive_key, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt_file, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt_file, m)?)?;
    m.add_function(wrap_pyfunction!(kek_name, m)?)?;
    m.add_function(wrap_pyfunction!(unwrap_dek, m)?)?;
    m.add_function(wrap_pyfunction!(dump_state, m)?)?;
    m.add_function(wrap_pyfunction!(load_state, m)?)?;
    m.add("TESTING_KEK", PyBytes::new(m.py(), crate::kek::TESTING_KEK))?;
    Ok(())
}
