//! The one Server-Sent Events parser of taskstream's tests, load tool and fault run: the line
//! grammar (`parse_line`), an incremental event parser for the hot path of the load tool
//! (`SseParser`, WHATWG rules: lines end in CRLF, LF or CR; `data` lines are joined with LF; `id`
//! persists between events; an empty line dispatches; lines starting with `:` are comments), and
//! frame splitting for tests that keep each frame's exact bytes (`frame_end`, `lines`).

use std::cmp::Ordering;

/// One line of a stream, without its line end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// The blank line that ends a frame.
    Blank,
    /// `: text`: the text, one leading space removed.
    Comment(&'a [u8]),
    /// `name: value` (one leading space of the value removed), or a bare `name`.
    Field { name: &'a [u8], value: &'a [u8] },
}

/// Parses one line (without its line end) as the SSE grammar reads it.
pub fn parse_line(line: &[u8]) -> Line<'_> {
    fn strip(value: &[u8]) -> &[u8] {
        value.strip_prefix(b" ").unwrap_or(value)
    }
    match line.first() {
        None => Line::Blank,
        Some(b':') => Line::Comment(strip(&line[1..])),
        Some(_) => match memchr::memchr(b':', line) {
            Some(c) => Line::Field {
                name: &line[..c],
                value: strip(&line[c + 1..]),
            },
            None => Line::Field {
                name: line,
                value: b"",
            },
        },
    }
}

/// Where the first complete frame of `buffer` ends (just after its blank line), for a stream
/// framed with LF only, as taskstream's is: a test keeps the frame's exact bytes.
pub fn frame_end(buffer: &[u8]) -> Option<usize> {
    memchr::memmem::find(buffer, b"\n\n").map(|at| at + 2)
}

/// The lines of one LF-framed frame, blank line excluded.
pub fn lines(frame: &[u8]) -> impl Iterator<Item = Line<'_>> {
    frame
        .split(|&b| b == b'\n')
        .map(parse_line)
        .filter(|line| *line != Line::Blank)
}

/// One dispatched event. `id` is the stream's last event id at dispatch time;
/// `had_id` tells whether this very event carried an `id:` field.
pub struct Event<'a> {
    pub kind: &'a [u8],
    pub data: &'a [u8],
    pub id: &'a [u8],
    pub had_id: bool,
}

#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<u8>,
    kind: Vec<u8>,
    last_id: Vec<u8>,
    had_id: bool,
    skip_lf: bool,
    /// Number of fields (not comments) seen so far.
    pub fields: u64,
    /// Whether the first field of the stream was `retry:`.
    pub first_field_retry: Option<bool>,
    pub retry_seen: bool,
    pub comments: u64,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream's current last event id.
    pub fn last_id(&self) -> &[u8] {
        &self.last_id
    }

    /// Feed decoded body bytes; `on_event` is called for every dispatched event.
    pub fn feed(&mut self, input: &[u8], mut on_event: impl FnMut(Event<'_>)) {
        // Fast path: nothing pending, parse straight from `input`.
        if self.buf.is_empty() {
            let used = self.parse(input, &mut on_event);
            self.buf.extend_from_slice(&input[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.buf);
            buf.extend_from_slice(input);
            let used = self.parse(&buf, &mut on_event);
            buf.drain(..used);
            self.buf = buf;
        }
    }

    /// Parse complete lines of `input`; returns the number of bytes used.
    fn parse(&mut self, input: &[u8], on_event: &mut impl FnMut(Event<'_>)) -> usize {
        let mut pos = 0;
        if self.skip_lf && !input.is_empty() {
            if input[0] == b'\n' {
                pos = 1;
            }
            self.skip_lf = false;
        }
        while pos < input.len() {
            let rest = &input[pos..];
            let Some(eol) = memchr::memchr2(b'\n', b'\r', rest) else {
                break;
            };
            let line = &rest[..eol];
            let mut next = pos + eol + 1;
            if rest[eol] == b'\r' {
                if eol + 1 < rest.len() {
                    if rest[eol + 1] == b'\n' {
                        next += 1;
                    }
                } else {
                    self.skip_lf = true;
                }
            }
            self.line(line, on_event);
            pos = next;
        }
        pos
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        let (name, value) = match parse_line(line) {
            Line::Blank => {
                if !self.data.is_empty() {
                    self.data.pop(); // trailing LF
                    let kind: &[u8] = if self.kind.is_empty() {
                        b"message"
                    } else {
                        &self.kind
                    };
                    on_event(Event {
                        kind,
                        data: &self.data,
                        id: &self.last_id,
                        had_id: self.had_id,
                    });
                }
                self.data.clear();
                self.kind.clear();
                self.had_id = false;
                return;
            }
            Line::Comment(_) => {
                self.comments += 1;
                return;
            }
            Line::Field { name, value } => (name, value),
        };
        if self.first_field_retry.is_none() {
            self.first_field_retry = Some(name == b"retry");
        }
        self.fields += 1;
        match name {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => {
                self.kind.clear();
                self.kind.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.last_id.clear();
                self.last_id.extend_from_slice(value);
                self.had_id = true;
            }
            b"retry" => self.retry_seen = true,
            _ => {}
        }
    }
}

/// Splits an id into its decimal digit groups (`1700000000000-3` -> [1700000000000, 3]).
pub fn id_groups(id: &[u8], out: &mut Vec<u128>) {
    out.clear();
    let mut cur: Option<u128> = None;
    for &b in id {
        if b.is_ascii_digit() {
            let d = (b - b'0') as u128;
            cur = Some(cur.unwrap_or(0).saturating_mul(10).saturating_add(d));
        } else if let Some(v) = cur.take() {
            out.push(v);
        }
    }
    if let Some(v) = cur {
        out.push(v);
    }
}

/// Compare two ids group by group, as the SPEC orders them.
pub fn cmp_groups(a: &[u128], b: &[u128]) -> Ordering {
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(chunks: &[&[u8]]) -> Vec<(String, String, String, bool)> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| {
                out.push((
                    String::from_utf8_lossy(e.kind).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                    String::from_utf8_lossy(e.id).into_owned(),
                    e.had_id,
                ))
            });
        }
        out
    }

    #[test]
    fn parses_frames_split_at_every_byte() {
        let raw: &[u8] = b"retry: 3000\n\n: keep\n\nid: 1\nevent: task_updated\ndata: {\"a\":1}\n\nid: 2\r\ndata: x\r\ndata: y\r\n\r\ndata:z\r\rid: 3\ndata\n\n";
        let whole = collect(&[raw]);
        assert_eq!(
            whole,
            vec![
                ("task_updated".into(), "{\"a\":1}".into(), "1".into(), true),
                ("message".into(), "x\ny".into(), "2".into(), true),
                ("message".into(), "z".into(), "2".into(), false),
                ("message".into(), "".into(), "3".into(), true),
            ]
        );
        for split in 0..raw.len() {
            assert_eq!(
                collect(&[&raw[..split], &raw[split..]]),
                whole,
                "split {split}"
            );
        }
        let bytes: Vec<&[u8]> = raw.chunks(1).collect();
        assert_eq!(collect(&bytes), whole);
    }

    #[test]
    fn frames_split_into_lines_with_their_exact_bytes() {
        let buffer = b"retry: 3000\n\n: keep-alive\n\nid: 1\nevent: reset\ndata: {}\n\nid: 2";
        let first = frame_end(buffer).unwrap();
        assert_eq!(&buffer[..first], b"retry: 3000\n\n");
        let second = first + frame_end(&buffer[first..]).unwrap();
        assert_eq!(
            lines(&buffer[first..second]).collect::<Vec<_>>(),
            vec![Line::Comment(b"keep-alive")]
        );
        let third = second + frame_end(&buffer[second..]).unwrap();
        assert_eq!(
            lines(&buffer[second..third]).collect::<Vec<_>>(),
            vec![
                Line::Field {
                    name: b"id",
                    value: b"1"
                },
                Line::Field {
                    name: b"event",
                    value: b"reset"
                },
                Line::Field {
                    name: b"data",
                    value: b"{}"
                },
            ]
        );
        assert_eq!(
            frame_end(&buffer[third..]),
            None,
            "an incomplete frame waits"
        );
        assert_eq!(
            parse_line(b"data"),
            Line::Field {
                name: b"data",
                value: b""
            }
        );
        assert_eq!(
            parse_line(b"data:x: y"),
            Line::Field {
                name: b"data",
                value: b"x: y"
            }
        );
    }

    #[test]
    fn first_field_retry() {
        let mut p = SseParser::new();
        p.feed(b": hi\n\nretry: 10\n\n", |_| {});
        assert_eq!(p.first_field_retry, Some(true));
        assert!(p.retry_seen);
    }

    #[test]
    fn id_ordering() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        id_groups(b"1795335657:9", &mut a);
        id_groups(b"1795335658:0", &mut b);
        assert_eq!(cmp_groups(&a, &b), Ordering::Less);
        id_groups(b"42", &mut a);
        id_groups(b"100", &mut b);
        assert_eq!(cmp_groups(&a, &b), Ordering::Less);
        id_groups(b"1700000000000-3", &mut a);
        assert_eq!(a, vec![1700000000000, 3]);
    }
}
