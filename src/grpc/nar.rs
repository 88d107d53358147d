//! NAR streams over gRPC: a store's blocking `export_nar`/`import_nar` on one side, chunks in a
//! channel on the other.

use std::io::{self, Read, Write};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::CHUNK_BYTES;
use crate::store::{PathInfo, Store, StoreError};

/// A chunk, or why the stream broke.
pub type Chunk = Result<Vec<u8>, String>;

/// Reads the chunks of a channel as one byte stream (blocking: use in a blocking task). A chunk
/// error becomes an I/O error; reading more than `max` bytes is an error too.
pub struct ChunkReader {
    rx: mpsc::Receiver<Chunk>,
    buf: Vec<u8>,
    pos: usize,
    total: u64,
    max: u64,
}

impl ChunkReader {
    pub fn new(rx: mpsc::Receiver<Chunk>, max: u64) -> Self {
        ChunkReader {
            rx,
            buf: Vec::new(),
            pos: 0,
            total: 0,
            max,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(c)) => {
                    self.total += c.len() as u64;
                    if self.total > self.max {
                        return Err(io::Error::other(format!(
                            "the NAR is larger than the limit of {} bytes",
                            self.max
                        )));
                    }
                    self.buf = c;
                    self.pos = 0;
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes a byte stream as chunks into a channel (blocking: use in a blocking task).
pub struct ChunkWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(tx: mpsc::Sender<Chunk>) -> Self {
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the NAR stream was closed"))
    }

    /// Sends what is buffered.
    pub fn finish(mut self) -> io::Result<()> {
        self.send()
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams the NAR of a valid path from `store` as chunks; an export error ends the stream with
/// an error chunk.
pub fn export(store: Arc<dyn Store>, path: String) -> mpsc::Receiver<Chunk> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter::new(tx.clone());
        let r = store
            .export_nar(&path, &mut w)
            .map_err(|e| e.to_string())
            .and_then(|_| w.finish().map_err(|e| e.to_string()));
        if let Err(e) = r {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Imports a path from chunks (verifying narHash and narSize, as `import_nar` does). Returns the
/// sender to feed and the import's outcome.
pub fn import(
    store: Arc<dyn Store>,
    info: PathInfo,
    max: u64,
) -> (
    mpsc::Sender<Chunk>,
    tokio::task::JoinHandle<Result<(), StoreError>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::task::spawn_blocking(move || {
        let mut r = ChunkReader::new(rx, max);
        let res = store.import_nar(&info, &mut r);
        // Drain what is left so the sender never blocks on a failed import.
        let mut sink = [0u8; 8192];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        res
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_round_trip_and_limits() {
        let (tx, rx) = mpsc::channel(2);
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| i as u8).collect();
        let d2 = data.clone();
        let w = tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter::new(tx);
            w.write_all(&d2).unwrap();
            w.finish().unwrap();
        });
        let got = tokio::task::spawn_blocking(move || {
            let mut r = ChunkReader::new(rx, u64::MAX);
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
        .await
        .unwrap();
        w.await.unwrap();
        assert_eq!(got, data);

        let (tx, rx) = mpsc::channel(2);
        tx.send(Ok(vec![0; 10])).await.unwrap();
        drop(tx);
        let e = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            ChunkReader::new(rx, 5).read_to_end(&mut v)
        })
        .await
        .unwrap();
        assert!(e.unwrap_err().to_string().contains("limit"));
    }
}
