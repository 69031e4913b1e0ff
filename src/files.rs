//! The file stream format on regular files: positional reads and writes, done
//! by a reader and a writer thread so that the file system's page-cache work
//! overlaps with the cipher.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use crate::cipher::{DataCipher, BLOCK, FILE_HEADER};
use crate::errors::KmiResult;
use crate::v2::V2Key;

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

/// Run `transform` over `src` from `src_off` to its end, `chunk` bytes at a
/// time, writing its output to `dst` from `dst_start`. A reader thread reads
/// ahead and a writer thread writes behind, so the page-cache copies overlap
/// with the cipher on the calling thread. `transform(Some(data), out)` turns a
/// chunk into output; `transform(None, out)` finishes at end of file.
/// Returns (bytes read, bytes written); the first error of any side wins.
fn pipeline(
    src: &File,
    src_off: u64,
    chunk: usize,
    dst: &File,
    dst_start: u64,
    mut transform: impl FnMut(Option<&[u8]>, &mut Vec<u8>) -> KmiResult<()>,
) -> KmiResult<(u64, u64)> {
    std::thread::scope(|scope| {
        // Two buffers in flight on each side; spent ones are sent back.
        let (read_tx, read_rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(2);
        let (free_in_tx, free_in_rx) = mpsc::channel::<Vec<u8>>();
        let (write_tx, write_rx) = mpsc::sync_channel::<(Vec<u8>, u64)>(2);
        let (free_out_tx, free_out_rx) = mpsc::channel::<Vec<u8>>();
        scope.spawn(move || {
            let mut at = src_off;
            loop {
                let mut buf = free_in_rx.try_recv().unwrap_or_default();
                buf.resize(chunk, 0);
                let result = read_full_at(src, &mut buf, at).map(|n| {
                    buf.truncate(n);
                    at += n as u64;
                    buf
                });
                let last = !matches!(&result, Ok(b) if !b.is_empty());
                if read_tx.send(result).is_err() || last {
                    return;
                }
            }
        });
        let writer = scope.spawn(move || -> io::Result<()> {
            for (buf, at) in write_rx {
                dst.write_all_at(&buf, at)?;
                let _ = free_out_tx.send(buf);
            }
            Ok(())
        });
        let (mut read, mut at) = (0u64, dst_start);
        let produced = (|| -> KmiResult<()> {
            loop {
                let input = read_rx
                    .recv()
                    .map_err(|_| io::Error::other("reader stopped"))??;
                let mut out = free_out_rx.try_recv().unwrap_or_default();
                out.clear();
                let done = input.is_empty();
                read += input.len() as u64;
                transform((!done).then_some(&input[..]), &mut out)?;
                let _ = free_in_tx.send(input);
                let n = out.len() as u64;
                if n > 0 {
                    if write_tx.send((out, at)).is_err() {
                        return Ok(()); // the writer failed: its error is reported below
                    }
                    at += n;
                }
                if done {
                    return Ok(());
                }
            }
        })();
        drop(write_tx);
        drop(read_rx); // stops a reader that is still ahead after an error
        writer.join().expect("the writer thread does not panic")?;
        produced.map(|()| (read, at - dst_start))
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
    let mut size = 0;
    let body = dst_off + FILE_HEADER as u64;
    let (read, written) = pipeline(src, src_off, chunk.max(BLOCK), dst, body, |data, out| {
        match data {
            Some(data) => enc.as_mut().expect("not finished").update(data, out),
            None => size = enc.take().expect("not finished").finish(out),
        }
        Ok(())
    })?;
    dst.write_all_at(&size.to_le_bytes(), dst_off)?;
    Ok(Moved {
        read,
        written: FILE_HEADER as u64 + written,
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
    let body = src_off + FILE_HEADER as u64;
    let (read, written) = pipeline(
        src,
        body,
        chunk.max(BLOCK),
        dst,
        dst_off,
        |data, out| match data {
            Some(data) => dec.as_mut().expect("not finished").update(data, out),
            None => dec.take().expect("not finished").finish(),
        },
    )?;
    Ok(Moved {
        read: FILE_HEADER as u64 + read,
        written,
    })
}

/// Seal regular file `src` from `src_off` to its end into `dst` at
/// `dst_off`, in the v2 format, with the same pipeline as the legacy format.
pub fn seal_file_at(
    key: &V2Key,
    ad: &[u8],
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    chunk: usize,
) -> KmiResult<Moved> {
    let mut sealer = key.sealer(ad)?;
    let header = *sealer.header();
    dst.write_all_at(&header, dst_off)?;
    let body = dst_off + header.len() as u64;
    let (read, written) = pipeline(src, src_off, chunk, dst, body, |data, out| match data {
        Some(data) => sealer.update(data, out),
        None => sealer.finish(out),
    })?;
    Ok(Moved {
        read,
        written: header.len() as u64 + written,
    })
}

/// Open a v2 stream from `src` at `src_off` into `dst` at `dst_off`. Each
/// chunk is written only once verified; on error the caller truncates `dst`
/// back to `dst_off`, so no unverified plaintext is left (a stream cut at a
/// chunk boundary is found only at its end).
pub fn open_file_at(
    key: &V2Key,
    ad: &[u8],
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    chunk: usize,
) -> KmiResult<Moved> {
    let mut opener = key.opener(ad);
    let (read, written) = pipeline(src, src_off, chunk, dst, dst_off, |data, out| match data {
        Some(data) => opener.update(data, out),
        None => opener.finish(out),
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
