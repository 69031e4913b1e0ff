//! The crate's one error type, and the single place where it becomes a Python exception.

use std::fmt;

/// Everything that can go wrong in the facility, by the kind of answer the caller gets.
#[derive(Debug)]
pub enum KmiError {
    /// A KEK that cannot be used: malformed PEM, wrong passphrase, not RSA,
    /// unsupported protection, absurd size. Python: `ValueError`.
    BadKey(String),
    /// A ciphertext, file stream or wrapped DEK that does not decrypt. Python: `ValueError`.
    BadData(String),
    /// An argument outside what the API accepts (salt or IV length, key size). Python: `ValueError`.
    BadArgument(String),
    /// No DEK is stored under that name, or the name is not a plain file name. Python: `KeyError`.
    NotFound(String),
    /// Another DEK is stored under that name already: keys are written once.
    /// Python: `KeyExistsError`, a `ValueError`.
    Exists(String),
    /// The storage directory or a file stream failed. Python: `OSError` (with errno).
    Io(std::io::Error),
}

pub type KmiResult<T> = Result<T, KmiError>;

impl KmiError {
    pub fn bad_key(msg: impl Into<String>) -> Self {
        KmiError::BadKey(msg.into())
    }
    pub fn bad_data(msg: impl Into<String>) -> Self {
        KmiError::BadData(msg.into())
    }
}

impl fmt::Display for KmiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KmiError::BadKey(m) | KmiError::BadData(m) | KmiError::BadArgument(m) => f.write_str(m),
            KmiError::NotFound(name) => f.write_str(name),
            KmiError::Exists(name) => write!(
                f,
                "a different key is stored under the name {name} already; keys are written once"
            ),
            KmiError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for KmiError {}

impl From<std::io::Error> for KmiError {
    fn from(e: std::io::Error) -> Self {
        KmiError::Io(e)
    }
}

#[cfg(feature = "python")]
pyo3::create_exception!(
    _kmi,
    KeyExistsError,
    pyo3::exceptions::PyValueError,
    "A different key is stored under that name already: keys are written once."
);

#[cfg(feature = "python")]
impl From<KmiError> for pyo3::PyErr {
    fn from(e: KmiError) -> Self {
        use pyo3::exceptions::{PyKeyError, PyValueError};
        match e {
            KmiError::BadKey(m) | KmiError::BadData(m) | KmiError::BadArgument(m) => {
                PyValueError::new_err(m)
            }
            KmiError::NotFound(name) => PyKeyError::new_err(name),
            e @ KmiError::Exists(_) => KeyExistsError::new_err(e.to_string()),
            // OSError(errno, text) lets Python pick the subclass and keeps
            // errno, which callers test (ENOSPC becomes 503 in the server).
            KmiError::Io(e) => match e.raw_os_error() {
                Some(code) => pyo3::exceptions::PyOSError::new_err((code, e.to_string())),
                None => e.into(),
            },
        }
    }
}
