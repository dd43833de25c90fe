//! Incremental Server-Sent Events parser for upstream bodies.
//!
//! Written here rather than taken from a crate because the failover logic needs to see
//! comment lines (`: keep-alive`) as their own frames — they must not count as progress
//! for the idle deadline — and because it is on the hot path of every proxied token.

/// One complete SSE frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseFrame {
    /// The joined `data:` lines of one event.
    Data(String),
    /// A line starting with `:`; carries no content.
    Comment,
}

/// Why a body is not a usable SSE stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("the stream is not valid UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    /// One event (its unterminated line, or its joined `data:` lines) passed the cap: a
    /// gateway sending a line without end, or `data:` lines without the blank line that
    /// ends an event, would otherwise be buffered without bound.
    #[error("an event passed the limit of {limit} bytes without ending")]
    FrameTooLarge { limit: usize },
}

/// Default cap on one event, in bytes: OpenAI-style chunks are a few hundred bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Feeds on body chunks of any size and yields complete frames; a UTF-8 character or a
/// line split across chunks is reassembled. Holds at most `max_frame` bytes of one event.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// `data:` lines of the event being assembled.
    data: Option<String>,
    /// The previous chunk ended in `\r`; a leading `\n` of the next one belongs to it.
    pending_cr: bool,
    max_frame: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::with_max_frame(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl SseParser {
    /// A parser with the default event cap ([`DEFAULT_MAX_FRAME_BYTES`]).
    pub fn new() -> Self {
        SseParser::default()
    }

    /// A parser that refuses an event longer than `max_frame` bytes.
    pub fn with_max_frame(max_frame: usize) -> Self {
        SseParser {
            line: Vec::new(),
            data: None,
            pending_cr: false,
            max_frame,
        }
    }

    /// Parse `chunk`, appending complete frames to `out`. Returns an error for bytes that
    /// are not UTF-8 inside a complete line and for an event past the cap; the parser is
    /// not meant to be used after an error.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseFrame>) -> Result<(), SseError> {
        let mut rest = chunk;
        if self.pending_cr {
            self.pending_cr = false;
            if let Some(b'\n') = rest.first() {
                rest = &rest[1..];
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', rest) {
            self.check_size(pos)?;
            self.line.extend_from_slice(&rest[..pos]);
            if rest[pos] == b'\r' {
                match rest.get(pos + 1) {
                    Some(b'\n') => rest = &rest[pos + 2..],
                    Some(_) => rest = &rest[pos + 1..],
                    None => {
                        self.pending_cr = true;
                        rest = &[];
                    }
                }
            } else {
                rest = &rest[pos + 1..];
            }
            let line = std::mem::take(&mut self.line);
            self.end_line(&line, out)?;
        }
        self.check_size(rest.len())?;
        self.line.extend_from_slice(rest);
        Ok(())
    }

    /// Whether the event being assembled, with `more` bytes added, stays within the cap.
    fn check_size(&self, more: usize) -> Result<(), SseError> {
        let held = self.line.len() + more + self.data.as_ref().map_or(0, String::len);
        if held > self.max_frame {
            return Err(SseError::FrameTooLarge {
                limit: self.max_frame,
            });
        }
        Ok(())
    }

    /// True when bytes of an unfinished event are buffered (the stream was cut mid-frame).
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.data.is_some()
    }

    /// Handle one complete line: a blank line ends the event being assembled.
    fn end_line(&mut self, line: &[u8], out: &mut Vec<SseFrame>) -> Result<(), SseError> {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push(SseFrame::Data(data));
            }
            return Ok(());
        }
        if line[0] == b':' {
            out.push(SseFrame::Comment);
            return Ok(());
        }
        let line = std::str::from_utf8(line)?;
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        // `event:`, `id:` and `retry:` carry nothing an OpenAI client needs.
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        Ok(())
    }
}

/// One fuzz input through the parser, for the `sse_parser` fuzz target and the replay of
/// its corpus in `cargo test`: the first byte picks the chunk size, the second the event
/// cap (64 B to 16 KiB, small enough to be reached), the rest is the stream. Panics if a
/// frame passes the cap; an error ends the stream, as it does upstream.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    let [split, cap, stream @ ..] = data else {
        return;
    };
    let chunk = usize::from(*split).max(1);
    let max_frame = 64 * (usize::from(*cap) + 1);
    let mut parser = SseParser::with_max_frame(max_frame);
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        let result = parser.push(piece, &mut frames);
        for frame in frames.drain(..) {
            if let SseFrame::Data(data) = frame {
                assert!(
                    data.len() <= max_frame,
                    "a {}-byte frame passed the {max_frame}-byte cap",
                    data.len()
                );
            }
        }
        if result.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseFrame> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.push(chunk, &mut out).expect("utf8");
        }
        out
    }

    #[test]
    fn frames_and_comments() {
        let frames = parse_all(&[b": keep-alive\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n"]);
        assert_eq!(
            frames,
            vec![
                SseFrame::Comment,
                SseFrame::Data("{\"a\":1}".into()),
                SseFrame::Data("[DONE]".into())
            ]
        );
    }

    #[test]
    fn split_anywhere_including_inside_utf8_and_crlf() {
        let body = "data: {\"c\":\"héllo 🌍\"}\r\n\r\n: ping\r\n\r\ndata:x\r\n\r\n".as_bytes();
        let whole = parse_all(&[body]);
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(parse_all(&[a, b]), whole, "split at {split}");
        }
        assert_eq!(whole[0], SseFrame::Data("{\"c\":\"héllo 🌍\"}".into()));
        assert_eq!(whole[2], SseFrame::Data("x".into()));
    }

    #[test]
    fn multi_line_data_and_other_fields() {
        let frames = parse_all(&[b"event: message\nid: 7\ndata: a\ndata: b\n\n"]);
        assert_eq!(frames, vec![SseFrame::Data("a\nb".into())]);
    }

    #[test]
    fn an_endless_line_or_event_is_refused_at_the_cap() {
        let mut out = Vec::new();
        let mut parser = SseParser::with_max_frame(64);
        parser.push(b"data: ", &mut out).expect("small so far");
        let err = (0..10)
            .find_map(|_| parser.push(&[b'x'; 16], &mut out).err())
            .expect("refused");
        assert_eq!(err, SseError::FrameTooLarge { limit: 64 });
        assert!(parser.line.len() <= 64, "held {} bytes", parser.line.len());

        // Many short `data:` lines with no blank line between them are one growing event.
        let mut parser = SseParser::with_max_frame(64);
        let err = (0..100)
            .find_map(|_| parser.push(b"data: 0123456789\n", &mut out).err())
            .expect("refused");
        assert_eq!(err, SseError::FrameTooLarge { limit: 64 });
        assert!(out.is_empty());

        // Events up to the cap pass, however many there are.
        let mut parser = SseParser::with_max_frame(64);
        for _ in 0..1000 {
            parser
                .push(b"data: 0123456789\n\n", &mut out)
                .expect("small events");
        }
        assert_eq!(out.len(), 1000);
    }

    #[test]
    fn partial_frame_is_reported() {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        parser.push(b"data: {\"a\"", &mut out).expect("utf8");
        assert!(out.is_empty());
        assert!(parser.has_partial());
    }
}
