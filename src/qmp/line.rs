//! A buffered line reader that enforces a length cap while reading.
//!
//! A line over the cap is never held in memory whole: at most `cap` bytes plus one
//! buffer's worth are read before it is reported as too long, and the reader then
//! refuses to continue (the stream position is inside an unknown line).

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Bytes of an over-long line kept for the transcript.
pub(crate) const HEAD_KEEP: usize = 4096;

/// What one call to [`LineReader::next_line`] produced.
#[derive(Debug)]
pub(crate) enum Line {
    /// A full line without its `\n` (and without a `\r` before it).
    Complete(Vec<u8>),
    /// End of stream; `partial` holds an unterminated line, if any.
    Eof { partial: Vec<u8> },
    /// The line exceeded the cap; `head` is its start, `seen` how much was read.
    TooLong { head: Vec<u8>, seen: usize },
}

#[derive(Debug)]
pub(crate) struct LineReader<R> {
    inner: BufReader<R>,
    /// Bytes of the current line read so far. Kept here so a cancelled read
    /// (timeout) loses nothing.
    pending: Vec<u8>,
    cap: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(inner: R, cap: usize) -> Self {
        LineReader { inner: BufReader::with_capacity(64 * 1024, inner), pending: Vec::new(), cap }
    }

    /// Bytes of a line begun but not yet terminated (e.g. a reply cut off mid-line).
    pub(crate) fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// The longest line accepted, in bytes (terminator excluded).
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Reads the next line. Cancel-safe: bytes consumed from the socket are kept in
    /// `pending` until the line completes.
    pub(crate) async fn next_line(&mut self) -> std::io::Result<Line> {
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                return Ok(Line::Eof { partial: std::mem::take(&mut self.pending) });
            }
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            if self.pending.len() + take > self.cap {
                let seen = self.pending.len() + take;
                let room = HEAD_KEEP.saturating_sub(self.pending.len());
                self.pending.extend_from_slice(&avail[..take.min(room)]);
                let mut head = std::mem::take(&mut self.pending);
                head.truncate(HEAD_KEEP);
                self.inner.consume(take);
                return Ok(Line::TooLong { head, seen });
            }
            self.pending.extend_from_slice(&avail[..take]);
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                let mut line = std::mem::take(&mut self.pending);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Line::Complete(line));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], cap: usize) -> Vec<Line> {
        let mut r = LineReader::new(input, cap);
        let mut out = Vec::new();
        loop {
            let l = r.next_line().await.unwrap();
            let stop = !matches!(l, Line::Complete(_));
            out.push(l);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn splits_crlf_and_lf_lines_and_reports_partial_tail() {
        let out = lines(b"{\"a\":1}\r\n{\"b\":2}\n{\"c\"", 100).await;
        assert!(matches!(&out[0], Line::Complete(l) if l == b"{\"a\":1}"));
        assert!(matches!(&out[1], Line::Complete(l) if l == b"{\"b\":2}"));
        assert!(matches!(&out[2], Line::Eof { partial } if partial == b"{\"c\""));
    }

    #[tokio::test]
    async fn cap_is_enforced_inclusive() {
        let out = lines(b"12345\n123456\n", 5).await;
        assert!(matches!(&out[0], Line::Complete(l) if l == b"12345"));
        assert!(matches!(&out[1], Line::TooLong { head, seen } if head == b"123456" && *seen == 6));
    }

    #[tokio::test]
    async fn too_long_keeps_only_a_bounded_head() {
        let big = vec![b'x'; 1 << 20];
        let out = lines(&big, 10_000).await;
        match &out[0] {
            Line::TooLong { head, seen } => {
                assert_eq!(head.len(), HEAD_KEEP);
                assert!(*seen > 10_000 && *seen <= 10_000 + 64 * 1024, "seen {seen}");
            }
            other => panic!("expected TooLong, got {other:?}"),
        }
    }
}
