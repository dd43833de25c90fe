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

/// Feeds on body chunks of any size and yields complete frames; a UTF-8 character or a
/// line split across chunks is reassembled.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// `data:` lines of the event being assembled.
    data: Option<String>,
    /// The previous chunk ended in `\r`; a leading `\n` of the next one belongs to it.
    pending_cr: bool,
}

impl SseParser {
    pub fn new() -> Self {
        SseParser::default()
    }

    /// Parse `chunk`, appending complete frames to `out`. Returns an error for bytes that
    /// are not UTF-8 inside a complete line.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseFrame>) -> Result<(), std::str::Utf8Error> {
        let mut rest = chunk;
        if self.pending_cr {
            self.pending_cr = false;
            if let Some(b'\n') = rest.first() {
                rest = &rest[1..];
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', rest) {
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
        self.line.extend_from_slice(rest);
        Ok(())
    }

    /// True when bytes of an unfinished event are buffered (the stream was cut mid-frame).
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.data.is_some()
    }

    /// Handle one complete line: a blank line ends the event being assembled.
    fn end_line(&mut self, line: &[u8], out: &mut Vec<SseFrame>) -> Result<(), std::str::Utf8Error> {
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
    fn partial_frame_is_reported() {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        parser.push(b"data: {\"a\"", &mut out).expect("utf8");
        assert!(out.is_empty());
        assert!(parser.has_partial());
    }
}
