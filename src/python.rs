//! The pyo3 bindings behind `keas.kmi._kmi`: thin wrappers that convert
//! arguments, release the GIL for slow work, and call the concept modules.

use std::borrow::Cow;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use zeroize::Zeroizing;

use crate::cipher::{derive_cipher_key, DataCipher, FILE_HEADER};
use crate::errors::KmiError;
use crate::facility::{self, DekPolicy};

/// Bulk work below this many bytes keeps the GIL: the hand-off costs more.
const DETACH_BYTES: usize = 64 * 1024;

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
    PyBytes::new_with(py, len, |out| {
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
    PyBytes::new_with(py, len, |out| {
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

    #[getter]
    fn storage_dir(&self) -> String {
        self.inner.store().dir().to_string_lossy().into_owned()
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

#[pymodule(gil_used = false)]
fn _kmi(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Facility>()?;
    m.add_function(wrap_pyfunction!(derive_key, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt_file, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt_file, m)?)?;
    m.add_function(wrap_pyfunction!(kek_name, m)?)?;
    Ok(())
}
