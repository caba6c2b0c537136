//! A container's output as `bulkhead logs` replays it: every chunk the
//! process wrote, in order, tagged with the stream it came from.
//!
//! Each record is one byte for the stream (`1` stdout, `2` stderr), the chunk's
//! length as a big-endian u32, then the bytes exactly as written. Binary, not
//! Docker's JSON lines, so output that is not UTF-8 comes back byte for byte
//! and replay needs no parsing beyond the framing. A record cut short (the
//! writer died mid-write) ends the log; it is never misread as data.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Which stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    /// stdout (and a pty's output).
    Stdout = 1,
    /// stderr.
    Stderr = 2,
}

/// The largest chunk one record holds; larger writes become several records.
const MAX_CHUNK: usize = 1 << 20;

/// Appends records; cheap to clone, shared by the stdout and stderr copies.
#[derive(Clone, Debug)]
pub struct LogWriter {
    file: Arc<Mutex<File>>,
}

impl LogWriter {
    /// Opens (creating) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<LogWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(LogWriter {
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Appends `bytes` from `stream`. One `write` per record, under the lock,
    /// so records of the two streams never interleave.
    pub fn append(&self, stream: LogStream, bytes: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in bytes.chunks(MAX_CHUNK) {
            let mut record = Vec::with_capacity(5 + chunk.len());
            record.push(stream as u8);
            record.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            record.extend_from_slice(chunk);
            file.write_all(&record)?;
        }
        Ok(())
    }
}

/// Reads records from a log, from where it stopped last time (for `logs -f`).
pub struct LogReader {
    file: BufReader<File>,
    /// Offset just after the last whole record read.
    offset: u64,
}

impl LogReader {
    /// Opens a log for reading from its start.
    pub fn open(path: &Path) -> std::io::Result<LogReader> {
        Ok(LogReader {
            file: BufReader::new(File::open(path)?),
            offset: 0,
        })
    }

    /// The next whole record, or `None` at the end of what is written so far
    /// (a partly written record is left for a later call).
    pub fn next_record(&mut self) -> std::io::Result<Option<(LogStream, Vec<u8>)>> {
        let mut header = [0u8; 5];
        if !self.read_whole(&mut header)? {
            return Ok(None);
        }
        let stream = match header[0] {
            1 => LogStream::Stdout,
            2 => LogStream::Stderr,
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "damaged log: record of unknown stream {other} at byte {}",
                        self.offset
                    ),
                ))
            }
        };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_CHUNK {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("damaged log: record of {len} bytes at byte {}", self.offset),
            ));
        }
        let mut data = vec![0u8; len];
        if !self.read_whole(&mut data)? {
            // Rewind to the record's start: it is still being written.
            self.file.seek(SeekFrom::Start(self.offset))?;
            return Ok(None);
        }
        self.offset += 5 + len as u64;
        Ok(Some((stream, data)))
    }

    /// Fills `buf`, or returns false (rewound to the last record's end) if
    /// the file ends first.
    fn read_whole(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read(&mut buf[got..])? {
                0 => {
                    self.file.seek(SeekFrom::Start(self.offset))?;
                    return Ok(false);
                }
                n => got += n,
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_with_their_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let w = LogWriter::open(&path).unwrap();
        w.append(LogStream::Stdout, b"out\n").unwrap();
        w.append(LogStream::Stderr, &[0xff, 0x00, b'e']).unwrap();
        let mut r = LogReader::open(&path).unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some((LogStream::Stdout, b"out\n".to_vec()))
        );
        assert_eq!(
            r.next_record().unwrap(),
            Some((LogStream::Stderr, vec![0xff, 0x00, b'e']))
        );
        assert_eq!(r.next_record().unwrap(), None);
        // A follower sees what is appended later.
        w.append(LogStream::Stdout, b"later").unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some((LogStream::Stdout, b"later".to_vec()))
        );
    }

    #[test]
    fn a_half_written_record_waits_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, [1, 0, 0, 0, 4, b'a', b'b']).unwrap();
        let mut r = LogReader::open(&path).unwrap();
        assert_eq!(r.next_record().unwrap(), None);
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(b"cd").unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some((LogStream::Stdout, b"abcd".to_vec()))
        );
        std::fs::write(&path, [9, 0, 0, 0, 0]).unwrap();
        assert!(LogReader::open(&path).unwrap().next_record().is_err());
    }
}
