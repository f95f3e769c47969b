//! Server-sent events from the upstream, read straight off reqwest's body: each `data` payload
//! once its event is complete. No task, no channel: bytes are pulled from the connection only
//! when the next event is asked for, so a client that reads slowly slows the upstream read (TCP
//! back-pressure) instead of piling the answer up in memory, as async-openai's streams did (they
//! read the upstream in a spawned task into an unbounded channel).
//!
//! An event is at most `MAX_EVENT_BYTES`: a chunk of a chat answer is a few hundred bytes, and an
//! upstream that sends a line without end is cut rather than buffered.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;

/// The largest event accepted, in bytes (lines of one event together).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SseError {
    #[error("the stream broke: {0}")]
    Body(#[source] reqwest::Error),
    #[error("an event of the stream is larger than {MAX_EVENT_BYTES} bytes")]
    TooLarge,
}

pin_project_lite::pin_project! {
    /// The `data` of each event of `body`, in order; ends at `data: [DONE]` or at the body's end.
    pub struct SseData<S> {
        #[pin]
        body: S,
        // Bytes received and not yet split into lines.
        pending: BytesMut,
        // How far `pending` was searched for a line end.
        scanned: usize,
        // The current event's data lines, joined with `\n`.
        data: Vec<u8>,
        has_data: bool,
        done: bool,
    }
}

impl<S> SseData<S> {
    pub fn new(body: S) -> Self {
        Self {
            body,
            pending: BytesMut::new(),
            scanned: 0,
            data: Vec::new(),
            has_data: false,
            done: false,
        }
    }
}

/// What one line does to the event being read.
enum LineOutcome {
    Nothing,
    /// A blank line ended an event with data.
    Dispatch,
}

impl<S> SseData<S> {
    fn take_line(
        pending: &mut BytesMut,
        scanned: &mut usize,
        data: &mut Vec<u8>,
        has_data: &mut bool,
    ) -> Option<Result<LineOutcome, SseError>> {
        let end = pending[*scanned..].iter().position(|&b| b == b'\n')? + *scanned;
        let mut line = pending.split_to(end + 1);
        *scanned = 0;
        line.truncate(end);
        if line.last() == Some(&b'\r') {
            line.truncate(end - 1);
        }
        if line.is_empty() {
            return Some(Ok(if *has_data {
                LineOutcome::Dispatch
            } else {
                LineOutcome::Nothing
            }));
        }
        // `field: value` (one optional space); only `data` matters, comments (`:`) and `event`,
        // `id`, `retry` are skipped.
        if let Some(value) = line.strip_prefix(b"data") {
            let value = match value {
                [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
                [] => &[][..],
                _ => return Some(Ok(LineOutcome::Nothing)),
            };
            if data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                return Some(Err(SseError::TooLarge));
            }
            if *has_data {
                data.push(b'\n');
            }
            data.extend_from_slice(value);
            *has_data = true;
        }
        Some(Ok(LineOutcome::Nothing))
    }
}

impl<S> Stream for SseData<S>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>>,
{
    type Item = Result<Bytes, SseError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(None);
            }
            // Every whole line already received, before reading more.
            while let Some(outcome) =
                Self::take_line(this.pending, this.scanned, this.data, this.has_data)
            {
                match outcome {
                    Err(e) => {
                        *this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Ok(LineOutcome::Nothing) => {}
                    Ok(LineOutcome::Dispatch) => {
                        *this.has_data = false;
                        let data = Bytes::from(std::mem::take(this.data));
                        if data.as_ref() == b"[DONE]" {
                            *this.done = true;
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
            }
            *this.scanned = this.pending.len();
            if this.pending.len() + this.data.len() > MAX_EVENT_BYTES {
                *this.done = true;
                return Poll::Ready(Some(Err(SseError::TooLarge)));
            }
            match this.body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(mut chunk))) => {
                    while chunk.has_remaining() {
                        let piece = chunk.chunk();
                        this.pending.extend_from_slice(piece);
                        let n = piece.len();
                        chunk.advance(n);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(SseError::Body(e))));
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    // An event the body ended inside of is incomplete: not dispatched.
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    async fn events(chunks: &[&[u8]]) -> Vec<Result<String, String>> {
        let body = futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, reqwest::Error>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        SseData::new(body)
            .map(|e| {
                e.map(|d| String::from_utf8(d.to_vec()).unwrap())
                    .map_err(|e| e.to_string())
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn events_are_read_across_chunk_boundaries_and_line_endings() {
        let got = events(&[
            b": keep-alive\n\ndata: {\"a\"",
            b":1}\r\n\r\nevent: x\ndata:two\ndata: lines\n",
            b"\nid: 3\n\n",
            b"data: [DONE]\n\ndata: after\n\n",
        ])
        .await;
        assert_eq!(got, vec![Ok("{\"a\":1}".into()), Ok("two\nlines".into())]);
    }

    #[tokio::test]
    async fn an_unfinished_event_is_not_dispatched_and_a_huge_one_is_refused() {
        assert_eq!(events(&[b"data: {\"a\":1}\n\ndata: cut"]).await.len(), 1);
        let huge = vec![b'x'; MAX_EVENT_BYTES + 10];
        let got = events(&[b"data: ", &huge]).await;
        assert_eq!(got.len(), 1);
        assert!(
            got[0].as_ref().unwrap_err().contains("larger than"),
            "{got:?}"
        );
        let mut lines = Vec::new();
        for _ in 0..(MAX_EVENT_BYTES / 1000 + 1) {
            lines.extend_from_slice(b"data: ");
            lines.extend_from_slice(&[b'y'; 1000]);
            lines.push(b'\n');
        }
        let got = events(&[&lines]).await;
        assert!(
            got[0].as_ref().unwrap_err().contains("larger than"),
            "{got:?}"
        );
    }
}
