//! The state pickles of `EncryptedPersistent`, for states made of builtin
//! values only: the dicts of numbers, strings, bytes, lists and tuples that
//! most persistent objects hold.
//!
//! `dump` writes exactly the bytes that zodbpickle's C pickler writes at
//! protocol 2 (the format the encrypted ZODB states already hold), and `load`
//! reads that subset of the format back. Both answer `None` for anything
//! else (another type, a persistent reference, an opcode outside the subset,
//! a malformed pickle), and the Python layer then uses zodbpickle itself: the
//! fast path never changes a result, it only skips the pickler's per-object
//! Python callbacks and its set-up.
//!
//! Raw CPython calls are used because the limited API that pyo3's safe types
//! are built on here (abi3, Python 3.9) has no borrowed UTF-8 view of a str.
//! The GIL is held throughout and no Python code can run: every object the
//! walk borrows stays alive and unchanged while it is borrowed.

use std::collections::HashMap;
use std::ffi::{c_char, c_int};

use foldhash::fast::FixedState;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

// Pickle opcodes (Lib/pickletools.py), the ones this subset writes or reads.
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const BINUNICODE: u8 = b'X';
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const EMPTY_TUPLE: u8 = b')';
const MARK: u8 = b'(';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const POP: u8 = b'0';
const POP_MARK: u8 = b'1';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const GLOBAL: u8 = b'c';
const REDUCE: u8 = b'R';

/// The pickler's batch size for APPENDS and SETITEMS.
const BATCH: usize = 1000;
/// Deeper containers are left to zodbpickle (and its recursion limit).
const MAX_DEPTH: usize = 200;

/// Not in this subset: the caller falls back to zodbpickle.
struct Unsupported;

type Result<T> = std::result::Result<T, Unsupported>;

extern "C" {
    // Stable in every CPython 3; pyo3 declares it only for the 3.10+ limited API.
    fn PyUnicode_AsUTF8AndSize(
        unicode: *mut ffi::PyObject,
        size: *mut ffi::Py_ssize_t,
    ) -> *const c_char;
}

/// The objects protocol 2 uses to pickle `bytes`: `_codecs.encode` and the
/// interned `"latin1"` (the very objects the C pickler memoizes).
struct BytesReduce<'py> {
    encode: Bound<'py, PyAny>,
    latin1: Bound<'py, PyAny>,
}

static REDUCE_OBJECTS: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();

impl<'py> BytesReduce<'py> {
    fn new(py: Python<'py>) -> Option<Self> {
        let (encode, latin1) = REDUCE_OBJECTS
            .get_or_try_init(py, || -> PyResult<_> {
                let encode = py.import("_codecs")?.getattr("encode")?;
                // SAFETY: a NUL-terminated literal; a new reference or NULL.
                let latin1 = unsafe {
                    Bound::from_owned_ptr_or_err(
                        py,
                        ffi::PyUnicode_InternFromString(c"latin1".as_ptr()),
                    )
                }?;
                Ok((encode.unbind(), latin1.unbind()))
            })
            .ok()?;
        Some(BytesReduce {
            encode: encode.bind(py).clone(),
            latin1: latin1.bind(py).clone(),
        })
    }
}

/// The protocol-2 pickle of `obj`, as zodbpickle writes it, or `None`.
pub fn dump<'py>(obj: &Bound<'py, PyAny>) -> Option<Vec<u8>> {
    let py = obj.py();
    let reduce = BytesReduce::new(py)?;
    let mut w = Writer {
        out: Vec::with_capacity(256),
        memo: HashMap::with_hasher(FixedState::default()),
        next: 0,
        reduce: &reduce,
    };
    w.out.extend_from_slice(&[PROTO, 2]);
    let saved = w.save(obj.as_ptr(), 0);
    if saved.is_err() {
        // SAFETY: clearing the error indicator is always allowed with the GIL.
        unsafe { ffi::PyErr_Clear() };
        return None;
    }
    w.out.push(STOP);
    Some(w.out)
}

struct Writer<'a, 'py> {
    out: Vec<u8>,
    /// Object address -> memo index, as the pickler's memo table.
    memo: HashMap<usize, u32, FixedState>,
    next: u32,
    reduce: &'a BytesReduce<'py>,
}

impl Writer<'_, '_> {
    fn put(&mut self, key: Option<*mut ffi::PyObject>) {
        let idx = self.next;
        self.next += 1;
        if let Some(key) = key {
            self.memo.insert(key as usize, idx);
        }
        match u8::try_from(idx) {
            Ok(small) => self.out.extend_from_slice(&[BINPUT, small]),
            Err(_) => {
                self.out.push(LONG_BINPUT);
                self.out.extend_from_slice(&idx.to_le_bytes());
            }
        }
    }

    fn get(&mut self, idx: u32) {
        match u8::try_from(idx) {
            Ok(small) => self.out.extend_from_slice(&[BINGET, small]),
            Err(_) => {
                self.out.push(LONG_BINGET);
                self.out.extend_from_slice(&idx.to_le_bytes());
            }
        }
    }

    /// Writes the memo reference when `obj` was pickled before.
    fn memoized(&mut self, obj: *mut ffi::PyObject) -> bool {
        match self.memo.get(&(obj as usize)) {
            Some(&idx) => {
                self.get(idx);
                true
            }
            None => false,
        }
    }

    /// The C pickler's `save`, in its order: atoms, then the memo, then the
    /// containers.
    fn save(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<()> {
        // SAFETY: `obj` is a live object borrowed from the state being
        // pickled (or one of `self.reduce`'s), and the GIL is held.
        unsafe {
            if obj.is_null() {
                return Err(Unsupported); // an item lookup failed (error set)
            }
            if obj == ffi::Py_None() {
                self.out.push(NONE);
                return Ok(());
            }
            if obj == ffi::Py_True() || obj == ffi::Py_False() {
                self.out.push(if obj == ffi::Py_True() {
                    NEWTRUE
                } else {
                    NEWFALSE
                });
                return Ok(());
            }
            let tp = ffi::Py_TYPE(obj);
            if tp == std::ptr::addr_of_mut!(ffi::PyLong_Type) {
                return self.save_int(obj);
            }
            if tp == std::ptr::addr_of_mut!(ffi::PyFloat_Type) {
                let value = ffi::PyFloat_AsDouble(obj);
                self.out.push(BINFLOAT);
                self.out.extend_from_slice(&value.to_be_bytes());
                return Ok(());
            }
            if self.memoized(obj) {
                return Ok(());
            }
            if tp == std::ptr::addr_of_mut!(ffi::PyBytes_Type) {
                return self.save_bytes(obj, depth);
            }
            if tp == std::ptr::addr_of_mut!(ffi::PyUnicode_Type) {
                return self.save_str(obj);
            }
            if depth >= MAX_DEPTH {
                return Err(Unsupported);
            }
            if tp == std::ptr::addr_of_mut!(ffi::PyDict_Type) {
                return self.save_dict(obj, depth + 1);
            }
            if tp == std::ptr::addr_of_mut!(ffi::PyList_Type) {
                return self.save_list(obj, depth + 1);
            }
            if tp == std::ptr::addr_of_mut!(ffi::PyTuple_Type) {
                return self.save_tuple(obj, depth + 1);
            }
        }
        Err(Unsupported)
    }

    unsafe fn save_int(&mut self, obj: *mut ffi::PyObject) -> Result<()> {
        let mut overflow: c_int = 0;
        let value = ffi::PyLong_AsLongLongAndOverflow(obj, &mut overflow);
        if overflow != 0 || (value == -1 && !ffi::PyErr_Occurred().is_null()) {
            return Err(Unsupported);
        }
        if let Ok(small) = i32::try_from(value) {
            let b = small.to_le_bytes();
            if b[3] != 0 || b[2] != 0 {
                self.out.push(BININT);
                self.out.extend_from_slice(&b);
            } else if b[1] != 0 {
                self.out.extend_from_slice(&[BININT2, b[0], b[1]]);
            } else {
                self.out.extend_from_slice(&[BININT1, b[0]]);
            }
            return Ok(());
        }
        // LONG1: little-endian two's complement, one byte more than the bits
        // of |value| need, less a redundant 0xff sign byte.
        let bits = 64 - value.unsigned_abs().leading_zeros() as usize;
        let mut n = bits / 8 + 1;
        let b = i128::from(value).to_le_bytes();
        if value < 0 && n > 1 && b[n - 1] == 0xff && b[n - 2] & 0x80 != 0 {
            n -= 1;
        }
        self.out.extend_from_slice(&[LONG1, n as u8]);
        self.out.extend_from_slice(&b[..n]);
        Ok(())
    }

    unsafe fn save_str(&mut self, obj: *mut ffi::PyObject) -> Result<()> {
        let mut size: ffi::Py_ssize_t = 0;
        let data = PyUnicode_AsUTF8AndSize(obj, &mut size);
        if data.is_null() {
            // Lone surrogates: zodbpickle writes them with surrogatepass.
            return Err(Unsupported);
        }
        let len = u32::try_from(size).map_err(|_| Unsupported)?;
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out
            .extend_from_slice(std::slice::from_raw_parts(data as *const u8, size as usize));
        self.put(Some(obj));
        Ok(())
    }

    /// Protocol 2 has no bytes opcode: `bytes` pickles as
    /// `_codecs.encode(<the bytes as a latin-1 str>, "latin1")`, and `b""` as
    /// `bytes()`, each reduce call memoized like the C pickler's.
    unsafe fn save_bytes(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<()> {
        let len = ffi::PyBytes_Size(obj);
        let data =
            std::slice::from_raw_parts(ffi::PyBytes_AsString(obj) as *const u8, len as usize);
        if data.is_empty() {
            let bytes_type = std::ptr::addr_of_mut!(ffi::PyBytes_Type) as *mut ffi::PyObject;
            self.global(bytes_type, b"__builtin__\nbytes\n");
            self.out.push(EMPTY_TUPLE);
        } else {
            self.global(self.reduce.encode.as_ptr(), b"_codecs\nencode\n");
            if data.len() == 1 {
                // One latin-1 character decodes to CPython's shared
                // one-character str, which the memo may already hold.
                let single = ffi::PyUnicode_DecodeLatin1(
                    data.as_ptr() as *const c_char,
                    1,
                    std::ptr::null(),
                );
                if single.is_null() {
                    return Err(Unsupported);
                }
                // The shared str outlives this call (CPython keeps it), so its
                // address stays valid as a memo key after the decref.
                ffi::Py_DECREF(single);
                if !self.memoized(single) {
                    self.latin1_str(data);
                    self.put(Some(single));
                }
            } else {
                self.latin1_str(data);
                self.put(None);
            }
            self.save(self.reduce.latin1.as_ptr(), depth)?;
            self.out.push(TUPLE2);
            self.put(None);
        }
        self.out.push(REDUCE);
        self.put(Some(obj));
        Ok(())
    }

    fn global(&mut self, obj: *mut ffi::PyObject, name: &[u8]) {
        if !self.memoized(obj) {
            self.out.push(GLOBAL);
            self.out.extend_from_slice(name);
            self.put(Some(obj));
        }
    }

    /// BINUNICODE of the str whose code points are `data`'s bytes.
    fn latin1_str(&mut self, data: &[u8]) {
        let utf8_len = data.len() + data.iter().filter(|&&b| b >= 0x80).count();
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&(utf8_len as u32).to_le_bytes());
        self.out.reserve(utf8_len);
        for &b in data {
            if b < 0x80 {
                self.out.push(b);
            } else {
                self.out
                    .extend_from_slice(&[0xc0 | (b >> 6), 0x80 | (b & 0x3f)]);
            }
        }
    }

    unsafe fn save_dict(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<()> {
        self.out.push(EMPTY_DICT);
        self.put(Some(obj));
        let size = ffi::PyDict_Size(obj);
        let mut pos: ffi::Py_ssize_t = 0;
        let mut key = std::ptr::null_mut();
        let mut value = std::ptr::null_mut();
        if size == 0 {
            return Ok(());
        }
        if size == 1 {
            ffi::PyDict_Next(obj, &mut pos, &mut key, &mut value);
            self.save(key, depth)?;
            self.save(value, depth)?;
            self.out.push(SETITEM);
            return Ok(());
        }
        // Batches of BATCH pairs; a size that is a multiple of BATCH ends
        // with an empty batch, as the C pickler writes it.
        loop {
            let mut batch = 0;
            self.out.push(MARK);
            while ffi::PyDict_Next(obj, &mut pos, &mut key, &mut value) != 0 {
                self.save(key, depth)?;
                self.save(value, depth)?;
                batch += 1;
                if batch == BATCH {
                    break;
                }
            }
            self.out.push(SETITEMS);
            if batch != BATCH {
                return Ok(());
            }
        }
    }

    unsafe fn save_list(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<()> {
        self.out.push(EMPTY_LIST);
        self.put(Some(obj));
        let size = ffi::PyList_Size(obj) as usize;
        if size == 1 {
            self.save(ffi::PyList_GetItem(obj, 0), depth)?;
            self.out.push(APPEND);
            return Ok(());
        }
        let mut total = 0;
        while total < size {
            self.out.push(MARK);
            let end = (total + BATCH).min(size);
            for i in total..end {
                self.save(ffi::PyList_GetItem(obj, i as ffi::Py_ssize_t), depth)?;
            }
            total = end;
            self.out.push(APPENDS);
        }
        Ok(())
    }

    unsafe fn save_tuple(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<()> {
        let size = ffi::PyTuple_Size(obj);
        if size == 0 {
            self.out.push(EMPTY_TUPLE);
            return Ok(());
        }
        let small = size <= 3;
        if !small {
            self.out.push(MARK);
        }
        for i in 0..size {
            self.save(ffi::PyTuple_GetItem(obj, i), depth)?;
        }
        // A tuple that reached the memo while its items were saved is
        // recursive: drop the items and refer to the memoized one.
        if let Some(&idx) = self.memo.get(&(obj as usize)) {
            if small {
                self.out.extend(std::iter::repeat_n(POP, size as usize));
            } else {
                self.out.push(POP_MARK);
            }
            self.get(idx);
            return Ok(());
        }
        self.out.push(match size {
            1 => TUPLE1,
            2 => TUPLE2,
            3 => TUPLE3,
            _ => TUPLE,
        });
        self.put(Some(obj));
        Ok(())
    }
}

/// The object a pickle of this subset holds, or `None`.
pub fn load<'py>(py: Python<'py>, data: &[u8]) -> Option<Bound<'py, PyAny>> {
    let reduce = BytesReduce::new(py)?;
    let loaded = Reader {
        py,
        data,
        pos: 0,
        stack: Vec::with_capacity(16),
        marks: Vec::new(),
        memo: Vec::with_capacity(32),
        reduce: &reduce,
    }
    .run();
    if loaded.is_err() {
        // SAFETY: clearing the error indicator is always allowed with the GIL.
        unsafe { ffi::PyErr_Clear() };
    }
    loaded.ok()
}

struct Reader<'a, 'py> {
    py: Python<'py>,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Bound<'py, PyAny>>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: Vec<Option<Bound<'py, PyAny>>>,
    reduce: &'a BytesReduce<'py>,
}

impl<'a, 'py> Reader<'a, 'py> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or(Unsupported)?;
        let out = &data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let data = self.data;
        let rest = &data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or(Unsupported)?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    /// Items above the innermost MARK (the C unpickler's fence).
    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Bound<'py, PyAny>> {
        if self.stack.len() <= self.fence() {
            return Err(Unsupported);
        }
        Ok(self.stack.pop().unwrap())
    }

    fn push(&mut self, ptr: *mut ffi::PyObject) -> Result<()> {
        // SAFETY: `ptr` is a new reference from a CPython constructor, or NULL
        // with an exception set.
        let obj = unsafe { Bound::from_owned_ptr_or_opt(self.py, ptr) }.ok_or(Unsupported)?;
        self.stack.push(obj);
        Ok(())
    }

    fn put(&mut self, idx: usize) -> Result<()> {
        let top = self
            .stack
            .last()
            .filter(|_| self.stack.len() > self.fence())
            .ok_or(Unsupported)?
            .clone();
        if idx > self.memo.len() + 1024 {
            return Err(Unsupported); // sparse indexes: left to zodbpickle
        }
        if idx >= self.memo.len() {
            self.memo.resize(idx + 1, None);
        }
        self.memo[idx] = Some(top);
        Ok(())
    }

    fn get(&mut self, idx: usize) -> Result<()> {
        let obj = self
            .memo
            .get(idx)
            .and_then(|o| o.clone())
            .ok_or(Unsupported)?;
        self.stack.push(obj);
        Ok(())
    }

    /// The items above the innermost MARK, and that MARK removed.
    fn pop_mark(&mut self) -> Result<Vec<Bound<'py, PyAny>>> {
        let mark = self.marks.pop().ok_or(Unsupported)?;
        Ok(self.stack.split_off(mark))
    }

    fn tuple(&mut self, items: &[Bound<'py, PyAny>]) -> Result<()> {
        // SAFETY: PyTuple_New returns a new tuple of NULL slots (or NULL);
        // each slot is filled once with a new reference before it is shared.
        unsafe {
            let tuple = ffi::PyTuple_New(items.len() as ffi::Py_ssize_t);
            if tuple.is_null() {
                return Err(Unsupported);
            }
            for (i, item) in items.iter().enumerate() {
                ffi::PyTuple_SetItem(tuple, i as ffi::Py_ssize_t, item.clone().into_ptr());
            }
            self.push(tuple)
        }
    }

    fn run(mut self) -> Result<Bound<'py, PyAny>> {
        // SAFETY (all blocks below): CPython calls with the GIL held, on live
        // objects from the stack or memo; type checks come before the calls
        // that need a given type.
        loop {
            match self.byte()? {
                PROTO => {
                    if self.byte()? != 2 {
                        return Err(Unsupported);
                    }
                }
                STOP => return self.pop(),
                NONE => self.stack.push(self.py.None().into_bound(self.py)),
                NEWTRUE => self.push(unsafe { ffi::PyBool_FromLong(1) })?,
                NEWFALSE => self.push(unsafe { ffi::PyBool_FromLong(0) })?,
                BININT => {
                    let v = self.u32()? as i32;
                    self.push(unsafe { ffi::PyLong_FromLong(v.into()) })?
                }
                BININT1 => {
                    let v = self.byte()?;
                    self.push(unsafe { ffi::PyLong_FromLong(v.into()) })?
                }
                BININT2 => {
                    let b = self.take(2)?;
                    let v = u16::from_le_bytes([b[0], b[1]]);
                    self.push(unsafe { ffi::PyLong_FromLong(v.into()) })?
                }
                LONG1 => {
                    let n = self.byte()? as usize;
                    if n > 8 {
                        return Err(Unsupported);
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    if n > 0 {
                        let fill = if b[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                        let mut full = [fill; 8];
                        full[..n].copy_from_slice(b);
                        v = i64::from_le_bytes(full);
                    }
                    self.push(unsafe { ffi::PyLong_FromLongLong(v) })?
                }
                BINFLOAT => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(unsafe { ffi::PyFloat_FromDouble(v) })?
                }
                BINUNICODE => {
                    let n = self.u32()? as usize;
                    let s = self.take(n)?;
                    let ptr = unsafe {
                        ffi::PyUnicode_DecodeUTF8(
                            s.as_ptr() as *const c_char,
                            n as ffi::Py_ssize_t,
                            c"surrogatepass".as_ptr(),
                        )
                    };
                    self.push(ptr)?
                }
                EMPTY_DICT => self.push(unsafe { ffi::PyDict_New() })?,
                EMPTY_LIST => self.push(unsafe { ffi::PyList_New(0) })?,
                EMPTY_TUPLE => self.tuple(&[])?,
                MARK => self.marks.push(self.stack.len()),
                SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(&[key, value])?
                }
                SETITEMS => {
                    let items = self.pop_mark()?;
                    self.set_items(&items)?
                }
                APPEND => {
                    let item = self.pop()?;
                    self.append(std::slice::from_ref(&item))?
                }
                APPENDS => {
                    let items = self.pop_mark()?;
                    self.append(&items)?
                }
                op @ (TUPLE1 | TUPLE2 | TUPLE3) => {
                    let n = (op - TUPLE1 + 1) as usize;
                    if self.stack.len() < self.fence() + n {
                        return Err(Unsupported);
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.tuple(&items)?
                }
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.tuple(&items)?
                }
                BINPUT => {
                    let idx = self.byte()?.into();
                    self.put(idx)?
                }
                LONG_BINPUT => {
                    let idx = self.u32()? as usize;
                    self.put(idx)?
                }
                BINGET => {
                    let idx = self.byte()?.into();
                    self.get(idx)?
                }
                LONG_BINGET => {
                    let idx = self.u32()? as usize;
                    self.get(idx)?
                }
                GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let obj = match (module, name) {
                        (b"_codecs", b"encode") => self.reduce.encode.clone(),
                        (b"__builtin__" | b"builtins", b"bytes") => {
                            self.py.get_type::<pyo3::types::PyBytes>().into_any()
                        }
                        _ => return Err(Unsupported),
                    };
                    self.stack.push(obj)
                }
                REDUCE => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let made = self.reduce_bytes(&callable, &args)?;
                    self.push(made)?
                }
                _ => return Err(Unsupported),
            }
        }
    }

    /// `_codecs.encode(str, "latin1")` or `bytes()`, the two reduce calls
    /// that protocol 2 pickles bytes with; any other call is unsupported.
    fn reduce_bytes(
        &self,
        callable: &Bound<'py, PyAny>,
        args: &Bound<'py, PyAny>,
    ) -> Result<*mut ffi::PyObject> {
        let args = args
            .cast_exact::<pyo3::types::PyTuple>()
            .map_err(|_| Unsupported)?;
        if callable.is(&self.reduce.encode) && args.len() == 2 {
            let text = args.get_item(0).map_err(|_| Unsupported)?;
            let codec = args.get_item(1).map_err(|_| Unsupported)?;
            let is_latin1 = codec.is_exact_instance_of::<pyo3::types::PyString>()
                && codec.eq(&self.reduce.latin1).unwrap_or(false);
            if is_latin1 && text.is_exact_instance_of::<pyo3::types::PyString>() {
                // SAFETY: `text` is an exact str.
                return Ok(unsafe { ffi::PyUnicode_AsLatin1String(text.as_ptr()) });
            }
        } else if callable.is(self.py.get_type::<pyo3::types::PyBytes>()) && args.is_empty() {
            // SAFETY: an empty buffer.
            return Ok(unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), 0) });
        }
        Err(Unsupported)
    }

    fn set_items(&mut self, items: &[Bound<'py, PyAny>]) -> Result<()> {
        let dict = self
            .stack
            .last()
            .filter(|_| self.stack.len() > self.fence())
            .ok_or(Unsupported)?;
        if !dict.is_exact_instance_of::<pyo3::types::PyDict>() || !items.len().is_multiple_of(2) {
            return Err(Unsupported);
        }
        for pair in items.chunks_exact(2) {
            // SAFETY: `dict` is an exact dict; SetItem only borrows key and value.
            if unsafe { ffi::PyDict_SetItem(dict.as_ptr(), pair[0].as_ptr(), pair[1].as_ptr()) }
                != 0
            {
                return Err(Unsupported); // an unhashable key
            }
        }
        Ok(())
    }

    fn append(&mut self, items: &[Bound<'py, PyAny>]) -> Result<()> {
        let list = self
            .stack
            .last()
            .filter(|_| self.stack.len() > self.fence())
            .ok_or(Unsupported)?;
        if !list.is_exact_instance_of::<pyo3::types::PyList>() {
            return Err(Unsupported);
        }
        for item in items {
            // SAFETY: `list` is an exact list; Append only borrows the item.
            if unsafe { ffi::PyList_Append(list.as_ptr(), item.as_ptr()) } != 0 {
                return Err(Unsupported);
            }
        }
        Ok(())
    }
}
