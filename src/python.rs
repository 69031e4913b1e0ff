//! The pyo3 bindings behind `keas.kmi._kmi`: thin wrappers that convert
//! arguments, release the GIL for slow work, and call the concept modules.

use std::borrow::Cow;
use std::fs::File;
use std::os::fd::BorrowedFd;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use zeroize::Zeroizing;

use crate::cipher::{derive_cipher_key, DataCipher, FILE_HEADER};
use crate::errors::KmiError;
use crate::facility::{self, DekPolicy};
use crate::files::{decrypt_file_at, encrypt_file_at, Moved};

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
#[pyo3(signature = (key, fsrc, fdst, chunksize = 24 * 1024))]
fn decrypt_file(
    py: Python<'_>,
    key: &[u8],
    fsrc: &Bound<'_, PyAny>,
    fdst: &Bound<'_, PyAny>,
    chunksize: usize,
) -> PyResult<()> {
    let cipher = cipher_from_key(key)?;
    let chunksize = chunksize.max(1);
    let decrypt_at = |src: &File, src_off, dst: &File, dst_off, chunk| {
        decrypt_file_at(&cipher, src, src_off, dst, dst_off, chunk)
    };
    if between_files(py, fsrc, fdst, chunksize, decrypt_at)? {
        return Ok(());
    }
    let header = read_full(fsrc, FILE_HEADER)?;
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

/// The master facility's state: the key store and the DEK cache. The Python
/// class passes its (overridable) attributes on every call.
#[pyclass(frozen, module = "keas.kmi._kmi")]
struct Facility {
    inner: facility::Facility,
    on_fetch: Option<Py<PyAny>>,
}

impl Facility {
    fn fetched(&self, py: Python<'_>, name: Option<String>) -> PyResult<()> {
        if let (Some(cb), Some(name)) = (&self.on_fetch, name) {
            cb.call1(py, (name,))?;
        }
        Ok(())
    }

    fn cipher(
        &self,
        py: Python<'_>,
        kek: &[u8],
        policy: &DekPolicy,
        salt: &[u8],
    ) -> PyResult<std::sync::Arc<DataCipher>> {
        if let Some(cipher) = self.inner.cached_cipher(kek, policy.timeout, salt)? {
            return Ok(cipher);
        }
        let (cipher, fetched) = py.detach(|| self.inner.cipher(kek, policy, salt))?;
        self.fetched(py, fetched)?;
        Ok(cipher)
    }
}

#[pymethods]
impl Facility {
    #[new]
    #[pyo3(signature = (storage_dir, max_cached_deks = 10_000, on_fetch = None))]
    fn new(
        storage_dir: &str,
        max_cached_deks: usize,
        on_fetch: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        Ok(Facility {
            inner: facility::Facility::open(storage_dir, max_cached_deks)?,
            on_fetch,
        })
    }

    /// Generate a KEK and store its wrapped DEK; returns (name, KEK PEM).
    fn generate<'py>(
        &self,
        py: Python<'py>,
        bits: usize,
        exponent: u64,
        passphrase: &[u8],
        dek_length: usize,
    ) -> PyResult<(String, Bound<'py, PyBytes>)> {
        let (name, pem) =
            py.detach(|| self.inner.generate(bits, exponent, passphrase, dek_length))?;
        Ok((name, PyBytes::new(py, &pem)))
    }

    /// The DEK for a KEK, cached for `timeout` seconds.
    fn dek<'py>(
        &self,
        py: Python<'py>,
        kek: &Bound<'py, PyAny>,
        timeout: f64,
        passphrase: &[u8],
        dek_length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let kek = bytes_like(kek, "key")?;
        let policy = DekPolicy {
            timeout,
            passphrase,
            dek_length,
        };
        let (dek, fetched) = py.detach(|| self.inner.dek(&kek, &policy))?;
        self.fetched(py, fetched)?;
        Ok(PyBytes::new(py, &dek))
    }

    #[allow(clippy::too_many_arguments)]
    fn encrypt<'py>(
        &self,
        py: Python<'py>,
        kek: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        timeout: f64,
        passphrase: &[u8],
        dek_length: usize,
        salt: &[u8],
        iv: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let policy = DekPolicy {
            timeout,
            passphrase,
            dek_length,
        };
        let cipher = self.cipher(py, &bytes_like(kek, "key")?, &policy, salt)?;
        encrypt_bytes(py, &cipher, iv, &bytes_like(data, "data")?)
    }

    #[allow(clippy::too_many_arguments)]
    fn decrypt<'py>(
        &self,
        py: Python<'py>,
        kek: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        timeout: f64,
        passphrase: &[u8],
        dek_length: usize,
        salt: &[u8],
        iv: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let policy = DekPolicy {
            timeout,
            passphrase,
            dek_length,
        };
        let cipher = self.cipher(py, &bytes_like(kek, "key")?, &policy, salt)?;
        decrypt_bytes(py, &cipher, iv, &bytes_like(data, "data")?)
    }

    /// Names of the stored DEKs.
    fn names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(py.detach(|| self.inner.store().names())?)
    }

    fn read<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.inner.store().get(name)?;
        Ok(PyBytes::new(py, &data))
    }

    fn write(&self, py: Python<'_>, name: &str, data: &[u8]) -> PyResult<()> {
        Ok(py.detach(|| self.inner.store().put(name, data))?)
    }

    fn remove(&self, name: &str) -> PyResult<()> {
        self.inner.forget(Some(name));
        Ok(self.inner.store().remove(name)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.store().contains(name)
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
    m.add_function(wrap_pyfunction!(derive_key, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt_file, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt_file, m)?)?;
    m.add_function(wrap_pyfunction!(kek_name, m)?)?;
    m.add_function(wrap_pyfunction!(dump_state, m)?)?;
    m.add_function(wrap_pyfunction!(load_state, m)?)?;
    m.add("TESTING_KEK", PyBytes::new(m.py(), crate::kek::TESTING_KEK))?;
    Ok(())
}
