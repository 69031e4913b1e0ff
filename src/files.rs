//! The file stream format on regular files: positional reads and writes, with
//! the writes done by a second thread so that the file system's page-cache
//! work overlaps with reading and the cipher.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use crate::cipher::{DataCipher, BLOCK, FILE_HEADER};
use crate::errors::KmiResult;

/// Bytes moved by a file operation: read from the source, written to the destination.
pub struct Moved {
    pub read: u64,
    pub written: u64,
}

/// Fill `buf` from `src` at `offset`, stopping early only at end of file.
fn read_full_at(src: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Write what `produce` puts into its (cleared) buffer at consecutive offsets
/// from `start`, on a second thread, until `produce` returns `false`.
/// Returns the number of bytes written; the first error of either side wins.
fn write_behind(
    dst: &File,
    start: u64,
    mut produce: impl FnMut(&mut Vec<u8>) -> KmiResult<bool>,
) -> KmiResult<u64> {
    std::thread::scope(|scope| {
        // Two buffers in flight keep both threads busy; spent ones come back.
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, u64)>(2);
        let (spent_tx, spent_rx) = mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> io::Result<()> {
            for (buf, at) in full_rx {
                dst.write_all_at(&buf, at)?;
                let _ = spent_tx.send(buf);
            }
            Ok(())
        });
        let mut at = start;
        let produced = (|| {
            loop {
                let mut buf = spent_rx.try_recv().unwrap_or_default();
                buf.clear();
                let more = produce(&mut buf)?;
                let n = buf.len() as u64;
                if n > 0 {
                    if full_tx.send((buf, at)).is_err() {
                        return Ok(()); // the writer failed: its error is reported below
                    }
                    at += n;
                }
                if !more {
                    return Ok(());
                }
            }
        })();
        drop(full_tx);
        writer.join().expect("the writer thread does not panic")?;
        produced.map(|()| at - start)
    })
}

/// Encrypt regular file `src` from `src_off` to its end into `dst` at
/// `dst_off`, in the file format, reading `chunk` bytes at a time. Positional
/// I/O only: the callers' file positions are theirs to update.
pub fn encrypt_file_at(
    cipher: &DataCipher,
    iv: &[u8],
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    chunk: usize,
) -> KmiResult<Moved> {
    let mut enc = Some(cipher.file_encryptor(iv)?);
    let mut header = [0u8; FILE_HEADER];
    header[8..].copy_from_slice(iv);
    dst.write_all_at(&header, dst_off)?;
    let mut input = vec![0u8; chunk.max(BLOCK)];
    let mut read = 0u64;
    let mut size = None;
    let body = write_behind(dst, dst_off + FILE_HEADER as u64, |out| {
        let n = read_full_at(src, &mut input, src_off + read)?;
        read += n as u64;
        if n == 0 {
            size = enc.take().map(|e| e.finish(out));
            return Ok(false);
        }
        enc.as_mut().expect("not finished").update(&input[..n], out);
        Ok(true)
    })?;
    let size = size.expect("the stream was finished");
    dst.write_all_at(&size.to_le_bytes(), dst_off)?;
    Ok(Moved {
        read,
        written: FILE_HEADER as u64 + body,
    })
}

/// Decrypt the file format from `src` at `src_off` into `dst` at `dst_off`.
pub fn decrypt_file_at(
    cipher: &DataCipher,
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    chunk: usize,
) -> KmiResult<Moved> {
    let mut header = [0u8; FILE_HEADER];
    let n = read_full_at(src, &mut header, src_off)?;
    let mut dec = Some(cipher.file_decryptor(&header[..n])?);
    let mut input = vec![0u8; chunk.max(BLOCK)];
    let mut read = FILE_HEADER as u64;
    let written = write_behind(dst, dst_off, |out| {
        let n = read_full_at(src, &mut input, src_off + read)?;
        read += n as u64;
        if n == 0 {
            dec.take().expect("not finished").finish()?;
            return Ok(false);
        }
        dec.as_mut()
            .expect("not finished")
            .update(&input[..n], out)?;
        Ok(true)
    })?;
    Ok(Moved { read, written })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::derive_cipher_key;

    const IV: &[u8] = b"0123456789ABCDEF";

    #[test]
    fn positional_round_trip_at_offsets() {
        let c = DataCipher::new(&derive_cipher_key(b"some dek", b"12345678").unwrap());
        let dir = std::env::temp_dir().join(format!("kmi-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut prefixed = b"HEAD".to_vec();
        prefixed.extend_from_slice(&data);
        std::fs::write(dir.join("plain"), &prefixed).unwrap();
        let src = File::open(dir.join("plain")).unwrap();
        let enc = File::create(dir.join("enc")).unwrap();
        let moved = encrypt_file_at(&c, IV, &src, 4, &enc, 3, 1000).unwrap();
        assert_eq!(moved.read, data.len() as u64);
        let on_disk = std::fs::read(dir.join("enc")).unwrap();
        assert_eq!(moved.written as usize, on_disk.len() - 3);
        assert_eq!(
            moved.written as usize,
            FILE_HEADER + data.len().div_ceil(16) * 16
        );
        assert_eq!(&on_disk[3..11], &(data.len() as u64).to_le_bytes());
        // The same bytes whatever the chunk size.
        let enc2 = File::create(dir.join("enc2")).unwrap();
        encrypt_file_at(&c, IV, &src, 4, &enc2, 0, 16).unwrap();
        assert_eq!(std::fs::read(dir.join("enc2")).unwrap(), &on_disk[3..]);
        let enc = File::open(dir.join("enc")).unwrap();
        let out = File::create(dir.join("out")).unwrap();
        let moved = decrypt_file_at(&c, &enc, 3, &out, 0, 4096).unwrap();
        assert_eq!(moved.written, data.len() as u64);
        assert_eq!(std::fs::read(dir.join("out")).unwrap(), data);
        for cut in [1, 5, 16, 40] {
            std::fs::write(dir.join("short"), &on_disk[3..on_disk.len() - cut]).unwrap();
            let short = File::open(dir.join("short")).unwrap();
            assert!(decrypt_file_at(&c, &short, 0, &out, 0, 4096).is_err());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
