//! keas.kmi's core: KEKs, DEKs, the data cipher and the key store, in plain
//! Rust; `python` holds the pyo3 bindings that `keas.kmi._kmi` exposes.

pub mod audit;
pub mod cipher;
pub mod errors;
pub mod facility;
pub mod files;
pub mod kdf;
pub mod kek;
pub mod pem;
pub mod salt;
pub mod store;
pub mod v2;

#[cfg(feature = "python")]
mod python;
#[cfg(feature = "python")]
mod state;
